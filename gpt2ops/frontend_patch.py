"""The frontend directory: where TorchServe 0.12.0's Java frontend starts, holding one corrected class.

    python -m gpt2ops.frontend_patch --run-dir R       # (re)builds R/frontend; scripts/serve.sh calls it
    python -m gpt2ops.frontend_patch --check           # says whether the installed jar can be corrected

Why. Under continuous batching, `GET /models/<m>?customized=true` (and gRPC `DescribeModel` with
`customized`) wedges the model in TorchServe 0.12.0: `Model.pollInferJob` puts the describe job into
the batch *and* back at the head of the queue, because its `jobsRepo.isEmpty()` test comes after the
`put` and so always sends it to `jobsQueue.addFirst`. `ContinuousBatching.pollBatch` then takes that
same job again every time its batch is empty: the worker answers the describe for ever and never sees
another request (docs/engine.md, "Traps"). TorchServe is in limited maintenance; no fix will come.

What. `ts/model_server.py` starts Java with `-cp .:<ts>/frontend/*` from its working directory, so a
class file under that directory wins over the jar's copy. This module reads `Model.class` from the
pip-installed `model-server.jar`, checks that it is byte for byte 0.12.0's (SHA-256), replaces the
3-byte `ifeq` after that `isEmpty()` with `pop; nop; nop` (the describe job, already in the batch,
is sent once and not queued again) and writes the result to `<run-dir>/frontend/`, which
`scripts/serve.sh` starts TorchServe from. Anything else (another TorchServe, a rebuilt jar) is
refused with one line naming the jar and its hash: the server is not started with an unknown class.

The directory holds nothing but that class and `key_file.json`, a link to `<run-dir>/key_file.json`
(TorchServe writes its keys to `<working dir>/key_file.json`; the clients read them from the run
directory, as before). It is rebuilt at every start and left read-only (0555 folders, 0444 files), so
the run directory, where logs and sockets are written, is never on the frontend's class path.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import shutil
import stat
import sys
import zipfile
from pathlib import Path

from gpt2ops.errors import OpsError, cli

FRONTEND_DIR = "frontend"  # under the run directory: the frontend's working directory
KEY_FILE = "key_file.json"
CLASS_ENTRY = "org/pytorch/serve/wlm/Model.class"
# Model.class of the torchserve==0.12.0 wheel (model-server.jar of 2024-09-30), before and after the patch
ORIGINAL_SHA256 = "7c5523f1fe77fe79aa32665469e17725e70518692abcf4987989ef72f10d4cff"
# pollInferJob(Map, int, LinkedBlockingDeque), bytecode offsets 86-137 of 0.12.0:
#   job.getCmd() == DESCRIBE ? -> jobsRepo.isEmpty() ; ifeq +18 (-> jobsQueue.addFirst(job)) ; put ; return
CONTEXT = bytes.fromhex("b6020bb2020fa600222bb901ec0100" "990012" "2b1907b601c71907b901fc030057b1")
IFEQ_AT = 15  # where the 3-byte `ifeq +18` starts in CONTEXT
PATCH = bytes.fromhex("570000")  # pop (isEmpty's result); nop; nop: fall through to `put; return`


def installed_jar() -> Path:
    """model-server.jar of the `ts` package this Python imports (the one `torchserve` starts)."""
    spec = importlib.util.find_spec("ts")
    if spec is None or not spec.submodule_search_locations:
        raise OpsError("TorchServe's `ts` package is not installed for this Python",
                       "run make venv (it installs torchserve==0.12.0), or install requirements-serve.txt")
    jar = Path(next(iter(spec.submodule_search_locations))) / "frontend" / "model-server.jar"
    if not jar.is_file():
        raise OpsError(f"no model-server.jar at {jar}", "reinstall torchserve==0.12.0")
    return jar


def patched_model_class(jar: Path) -> bytes:
    """0.12.0's Model.class from `jar` with the describe job sent once; refuses any other class."""
    with zipfile.ZipFile(jar) as archive:
        try:
            original = archive.read(CLASS_ENTRY)
        except KeyError:
            raise OpsError(f"{jar} has no {CLASS_ENTRY}", "this is not TorchServe 0.12.0's frontend") from None
    digest = hashlib.sha256(original).hexdigest()
    if digest != ORIGINAL_SHA256:
        raise OpsError(f"{CLASS_ENTRY} in {jar} is not TorchServe 0.12.0's (sha256 {digest}, expected "
                       f"{ORIGINAL_SHA256}); the describe correction is made for that exact class only",
                       "install torchserve==0.12.0, or check the new version's Model.pollInferJob and "
                       "update gpt2ops/frontend_patch.py (docs/engine.md, Traps)")
    at = original.find(CONTEXT)
    if at < 0 or original.find(CONTEXT, at + 1) >= 0:  # cannot happen with the hash above; never patch blindly
        raise OpsError(f"the describe branch of Model.pollInferJob was not found once in {jar}",
                       "report this with the jar's sha256")
    at += IFEQ_AT
    return original[:at] + PATCH + original[at + len(PATCH):]


def _make_read_only(root: Path) -> None:
    for path in sorted(root.rglob("*"), reverse=True) + [root]:
        if path.is_symlink():
            continue
        path.chmod(0o555 if path.is_dir() else 0o444)


def _remove(root: Path) -> None:
    if root.is_symlink() or root.is_file():
        root.unlink()
        return
    for path in [root, *root.rglob("*")]:  # read-only folders of the previous start
        if path.is_dir() and not path.is_symlink():
            path.chmod(stat.S_IRWXU)
    shutil.rmtree(root)


def build_frontend_dir(run_dir: Path, jar: Path | None = None) -> Path:
    """<run_dir>/frontend, rebuilt: the corrected Model.class and the key file's link; read-only."""
    run_dir = run_dir.resolve()
    target = run_dir / FRONTEND_DIR
    data = patched_model_class(jar or installed_jar())  # before anything is removed: a refusal changes nothing
    if target.exists() or target.is_symlink():
        _remove(target)
    class_file = target / CLASS_ENTRY
    class_file.parent.mkdir(parents=True)
    class_file.write_bytes(data)
    keys = run_dir / KEY_FILE
    # TorchServe creates <cwd>/key_file.json with File.createNewFile (which fails on a dangling link),
    # then writes and chmods it through the link: the target must exist
    fd = os.open(keys, os.O_WRONLY | os.O_CREAT, 0o600)
    os.close(fd)
    (target / KEY_FILE).symlink_to(keys)
    _make_read_only(target)
    return target


@cli
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", type=Path, help="build <run-dir>/frontend and print its path")
    parser.add_argument("--check", action="store_true", help="only check that the installed jar can be corrected")
    parser.add_argument("--jar", type=Path, help="model-server.jar to read (default: the installed ts package's)")
    args = parser.parse_args(argv)
    if args.check or args.run_dir is None:
        patched_model_class(args.jar or installed_jar())
        print(f"{args.jar or installed_jar()}: TorchServe 0.12.0's Model.class, correctable")
        return 0
    print(build_frontend_dir(args.run_dir, args.jar))
    return 0


if __name__ == "__main__":
    sys.exit(main())
