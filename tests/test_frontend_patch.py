"""gpt2ops.frontend_patch: the corrected Model.class is made from 0.12.0's exact bytes, or refused."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from gpt2ops.errors import OpsError
from gpt2ops.frontend_patch import (CLASS_ENTRY, FRONTEND_DIR, KEY_FILE, ORIGINAL_SHA256, PATCH, build_frontend_dir,
                                    installed_jar, patched_model_class)


def original_class() -> bytes:
    with zipfile.ZipFile(installed_jar()) as jar:
        return jar.read(CLASS_ENTRY)


def test_the_installed_jar_is_0_12_0s_and_the_patch_changes_three_bytes_in_one_place():
    original = original_class()
    assert hashlib.sha256(original).hexdigest() == ORIGINAL_SHA256
    patched = patched_model_class(installed_jar())
    changed = [i for i, (a, b) in enumerate(zip(original, patched)) if a != b]
    at = changed[0]
    assert len(patched) == len(original) and changed[-1] - at < 3  # one 3-byte instruction
    assert original[at:at + 3] == bytes.fromhex("990012") and patched[at:at + 3] == PATCH  # ifeq +18 -> pop; nop; nop


@pytest.mark.parametrize("mutate", [lambda b: b[:-1] + bytes([b[-1] ^ 1]), lambda b: b + b"\0", lambda b: b"\xca\xfe"])
def test_any_other_model_class_is_refused_naming_its_hash(tmp_path, mutate):
    jar = tmp_path / "model-server.jar"
    with zipfile.ZipFile(jar, "w") as out:
        out.writestr(CLASS_ENTRY, mutate(original_class()))
    with pytest.raises(OpsError, match="is not TorchServe 0.12.0's .*sha256") as err:
        build_frontend_dir(tmp_path / "run", jar)
    assert "install torchserve==0.12.0" in err.value.next_step
    assert not (tmp_path / "run" / FRONTEND_DIR).exists()


def test_the_frontend_dir_is_rebuilt_read_only_with_the_class_and_the_key_link_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for _ in range(2):  # the second start replaces the first's read-only folder
        target = build_frontend_dir(run)
    files = sorted(str(p.relative_to(target)) for p in target.rglob("*") if not p.is_dir())
    assert files == sorted([CLASS_ENTRY, KEY_FILE])
    assert (target / KEY_FILE).resolve() == run.resolve() / KEY_FILE
    assert (target / CLASS_ENTRY).read_bytes() == patched_model_class(installed_jar())
    assert all(p.stat().st_mode & 0o222 == 0 for p in [target, *target.rglob("*")] if not p.is_symlink())
