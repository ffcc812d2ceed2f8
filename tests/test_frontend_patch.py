"""gpt2ops.frontend_patch: each corrected class is made from 0.12.0's exact bytes, or refused."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from gpt2ops.errors import OpsError
from gpt2ops.frontend_patch import (CORRECTIONS, FRONTEND_DIR, KEY_FILE, Correction, build_frontend_dir,
                                    corrected_class, corrected_classes, installed_jar)

BY_NAME = {fix.entry.rsplit("/", 1)[1]: fix for fix in CORRECTIONS}
# (class, the 3 bytes before, at every place): the branches the corrections remove
BRANCHES = [("Model.class", "990012"),  # ifeq +18 -> jobsQueue.addFirst(describe job)
            ("WorkerThread.class", "c60012")]  # ifnull +18 -> skip sendError when no call is in flight


def original_class(fix: Correction) -> bytes:
    with zipfile.ZipFile(installed_jar()) as jar:
        return jar.read(fix.entry)


@pytest.mark.parametrize("name,branch", BRANCHES)
def test_the_installed_jar_is_0_12_0s_and_each_place_changes_one_3_byte_branch_to_pop_nop_nop(name, branch):
    fix = BY_NAME[name]
    original = original_class(fix)
    assert hashlib.sha256(original).hexdigest() == fix.original_sha256
    patched = corrected_class(installed_jar(), fix)
    assert len(patched) == len(original)
    changed = [i for i, (a, b) in enumerate(zip(original, patched)) if a != b]
    starts = [c for c in changed if original[c:c + 3] == bytes.fromhex(branch)]
    assert len(starts) == fix.places  # the branch at each place
    assert all(patched[at:at + 3] == bytes.fromhex("570000") for at in starts)  # pop; nop; nop
    assert all(any(at <= i < at + 3 for at in starts) for i in changed)  # and nothing else changed


@pytest.mark.parametrize("name", sorted(BY_NAME))
@pytest.mark.parametrize("mutate", [lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b + b"\0", lambda b: b"\xca\xfe"])
def test_any_other_class_is_refused_naming_its_hash(tmp_path, mutate, name):
    jar = tmp_path / "model-server.jar"
    with zipfile.ZipFile(jar, "w") as out:
        for fix in CORRECTIONS:
            original = original_class(fix)
            out.writestr(fix.entry, mutate(original) if fix is BY_NAME[name] else original)
    with pytest.raises(OpsError, match=f"{BY_NAME[name].entry} in .* is not TorchServe 0.12.0's .*sha256") as err:
        build_frontend_dir(tmp_path / "run", jar)
    assert "install torchserve==0.12.0" in err.value.next_step
    assert not (tmp_path / "run" / FRONTEND_DIR).exists()


def test_the_frontend_dir_is_rebuilt_read_only_with_the_classes_and_the_key_link_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for _ in range(2):  # the second start replaces the first's read-only folder
        target = build_frontend_dir(run)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir())
    assert files == sorted([*(fix.entry for fix in CORRECTIONS), KEY_FILE])
    assert (target / KEY_FILE).resolve() == run.resolve() / KEY_FILE
    for entry, data in corrected_classes().items():
        assert (target / entry).read_bytes() == data
    assert all(p.stat().st_mode & 0o222 == 0 for p in [target, *target.rglob("*")] if not p.is_symlink())
