"""The frontend directory: where TorchServe 0.12.0's Java frontend starts, holding two corrected classes.

    python -m gpt2ops.frontend_patch --run-dir R       # (re)builds R/frontend; scripts/serve.sh calls it
    python -m gpt2ops.frontend_patch --check           # says whether the installed jar can be corrected

Why. TorchServe is in limited maintenance; no fix will come for two faults of 0.12.0 under continuous
batching (docs/engine.md, "Traps"):
- `GET /models/<m>?customized=true` (and gRPC `DescribeModel` with `customized`) wedges the model:
  `Model.pollInferJob` puts the describe job into the batch *and* back at the head of the queue, because
  its `jobsRepo.isEmpty()` test comes after the `put`; `ContinuousBatching.pollBatch` then takes that same
  job again every time its batch is empty, and the worker never sees another request.
- A worker that dies between two iterations loses its open jobs: `WorkerThread.run`'s `finally` answers
  only the call in flight (`req`, already null between two calls), then `cleanJobs()` drops the rest.
  Their clients, which already have a 200 and part of a stream, wait for ever.

What. `ts/model_server.py` starts Java with `-cp .:<ts>/frontend/*` from its working directory, so a
class file under that directory wins over the jar's copy. This module reads each class of `CORRECTIONS`
from the pip-installed `model-server.jar`, checks that it is byte for byte 0.12.0's (SHA-256), changes
one 3-byte branch at each of its known places to `pop; nop; nop` and writes the result to
`<run-dir>/frontend/`, which `scripts/serve.sh` starts TorchServe from:
- Model.class: the describe job, already in the batch, is sent once and not queued again;
- WorkerThread.class: with no call in flight, `sendError(null, ...)` runs, which hands each open job back
  to the model's queue; the restarted worker answers it with an error that ends its body
  (handler.serving.orphans).
Anything else (another TorchServe, a rebuilt jar) is refused with one line naming the jar and its hash:
the server is not started with an unknown class.

The directory holds nothing but those classes and `key_file.json`, a link to `<run-dir>/key_file.json`
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
from dataclasses import dataclass
from pathlib import Path

from gpt2ops.errors import OpsError, cli

FRONTEND_DIR = "frontend"  # under the run directory: the frontend's working directory
KEY_FILE = "key_file.json"


@dataclass(frozen=True)
class Correction:
    """One class of TorchServe 0.12.0's model-server.jar (2024-09-30), with the same 3 bytes changed at each of
    `places` places found by their surrounding bytecode: made only from that exact class (its SHA-256)."""

    entry: str  # the class file's path in the jar
    original_sha256: str
    context: bytes  # the bytecode around one place
    at: int  # where the 3 changed bytes start in `context`
    patch: bytes  # what they become
    places: int  # how many times `context` occurs
    what: str  # the fault corrected, for messages


CORRECTIONS = (
    # Model.pollInferJob(Map, int, LinkedBlockingDeque), bytecode offsets 86-137:
    #   job.getCmd() == DESCRIBE ? -> jobsRepo.isEmpty() ; ifeq +18 (-> jobsQueue.addFirst(job)) ; put ; return
    # `ifeq +18` -> pop (isEmpty's result); nop; nop: fall through to `put; return`: the describe job is sent once
    Correction("org/pytorch/serve/wlm/Model.class",
               "7c5523f1fe77fe79aa32665469e17725e70518692abcf4987989ef72f10d4cff",
               bytes.fromhex("b6020bb2020fa600222bb901ec0100" "990012" "2b1907b601c71907b901fc030057b1"),
               15, bytes.fromhex("570000"), 1, "the customized describe re-queued for ever"),
    # WorkerThread.run, its `finally` (7 copies, one per way out of the try):
    #   if (req != null) aggregator.sendError(req, "Worker died.", status); aggregator.cleanJobs(); ...
    # A worker that dies between two iterations (req already null) had its open jobs dropped by cleanJobs:
    # clients with a 200 and half a stream waited for ever. `ifnull +18` -> pop; nop; nop: sendError(null, ...)
    # then hands each open job back to the model's queue (BatchAggregator.handleErrorJob -> Model.addFirst),
    # and the restarted worker answers it with an error that ends its body (handler.serving.orphans).
    Correction("org/pytorch/serve/wlm/WorkerThread.class",
               "5292f5b79ac1ec509876cd997e2605848fd79f0b15b24ebd1a96c9c6b035ffd6",
               bytes.fromhex("2ab40020" "c60012" "2ab4003e2ab400201301ef1cb601cc2ab4"),
               4, bytes.fromhex("570000"), 7, "open jobs dropped when a worker dies between two iterations"),
)
CLASS_ENTRY = CORRECTIONS[0].entry  # Model.class: the describe correction


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


def corrected_class(jar: Path, fix: Correction) -> bytes:
    """0.12.0's class `fix.entry` from `jar` with the correction made at each of its places; refuses any other
    class."""
    with zipfile.ZipFile(jar) as archive:
        try:
            original = archive.read(fix.entry)
        except KeyError:
            raise OpsError(f"{jar} has no {fix.entry}", "this is not TorchServe 0.12.0's frontend") from None
    digest = hashlib.sha256(original).hexdigest()
    if digest != fix.original_sha256:
        raise OpsError(f"{fix.entry} in {jar} is not TorchServe 0.12.0's (sha256 {digest}, expected "
                       f"{fix.original_sha256}); the correction ({fix.what}) is made for that exact class only",
                       "install torchserve==0.12.0, or check the new version's code and update "
                       "gpt2ops/frontend_patch.py (docs/engine.md, Traps)")
    places = []
    at = original.find(fix.context)
    while at >= 0:
        places.append(at + fix.at)
        at = original.find(fix.context, at + 1)
    if len(places) != fix.places:  # cannot happen with the hash above; never patch blindly
        raise OpsError(f"{fix.entry} in {jar}: the bytecode to correct ({fix.what}) was found {len(places)} "
                       f"times, not {fix.places}", "report this with the jar's sha256")
    data = bytearray(original)
    for at in places:
        data[at:at + len(fix.patch)] = fix.patch
    return bytes(data)


def corrected_classes(jar: Path | None = None) -> dict[str, bytes]:
    """Every corrected class, by its path in the jar."""
    jar = jar or installed_jar()
    return {fix.entry: corrected_class(jar, fix) for fix in CORRECTIONS}


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
    """<run_dir>/frontend, rebuilt: the corrected classes and the key file's link; read-only."""
    run_dir = run_dir.resolve()
    target = run_dir / FRONTEND_DIR
    classes = corrected_classes(jar)  # before anything is removed: a refusal changes nothing
    if target.exists() or target.is_symlink():
        _remove(target)
    for entry, data in classes.items():
        class_file = target / entry
        class_file.parent.mkdir(parents=True, exist_ok=True)
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
        corrected_classes(args.jar)
        print(f"{args.jar or installed_jar()}: TorchServe 0.12.0's {', '.join(f.entry for f in CORRECTIONS)}, "
              "correctable")
        return 0
    print(build_frontend_dir(args.run_dir, args.jar))
    return 0


if __name__ == "__main__":
    sys.exit(main())
