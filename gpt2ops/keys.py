#!/usr/bin/env python3
"""Print the running server's keys, or renew them.

    .venv/bin/python scripts/keys.py                    # the key file's path, each key and when it expires
    .venv/bin/python scripts/keys.py --renew            # new inference and management keys, printed
    .venv/bin/python scripts/keys.py --renew inference  # only the inference key
    KEY=$(.venv/bin/python scripts/keys.py --print inference)   # one key alone, for a shell variable
    from gpt2ops.keys import current_key; current_key("inference")   # the same in Python (.venv/bin/python)

(`make keys` and `make renew-keys` run the first two.) TorchServe 0.12.0 writes new keys to
<run-dir>/key_file.json at every start (--run-dir, else $RUN_DIR, else this checkout's run/: the
folder `make run` starts the server from, whatever directory this is run from). The inference and
management keys expire after `token_expiration_min` minutes (TorchServe's default, 60: this package's
config.properties does not change it); the API key never expires and only mints new keys
(`GET <management>/token?type=inference|management` with the API key, which rewrites the file and
ends the old key). A renewed key lives another `token_expiration_min` minutes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2ops.client import MissingKeyFile, START_HINT, add_server_arguments, default_run_dir, server_from_arguments
from gpt2ops.errors import OpsError, cli

KINDS = ("inference", "management", "API")
RENEWABLE = ("inference", "management")


def key_entries(key_file: Path) -> dict[str, dict]:
    """key_file.json as TorchServe wrote it: {kind: {"key": ..., "expiration time": ...}}."""
    if not key_file.exists():
        raise MissingKeyFile(f"no key file at {key_file}", START_HINT)
    try:
        data = json.loads(key_file.read_text())
        return {kind: dict(data[kind]) for kind in KINDS}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise OpsError(f"cannot read the keys from {key_file} ({type(err).__name__}: {err})",
                       "the server rewrites that file at start: restart it (make stop && make run)") from None


def current_key(kind: str = "inference", run_dir: str | Path | None = None) -> str:
    """The `kind` key of the server started from `run_dir` (default: $RUN_DIR, else this checkout's run/, the
    folder `make run` uses): what a client in this environment passes as its key, from any working directory."""
    return key_entries(Path(run_dir or default_run_dir()) / "key_file.json")[kind]["key"]


def describe(key_file: Path) -> str:
    lines = [f"key file: {key_file}"]
    for kind, entry in key_entries(key_file).items():
        expires = entry.get("expiration time") or ("never" if kind == "API" else "unknown")
        use = {"inference": "inference API (:8080)", "management": "management API (:8081)",
               "API": "only to renew the other two"}[kind]
        lines.append(f"{kind:<11} {entry['key']}  expires: {expires}  ({use})")
    return "\n".join(lines)


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--renew", nargs="?", const="both", choices=(*RENEWABLE, "both"),
                       help="renew the inference and management keys (or the one named) with the API key")
    group.add_argument("--print", dest="only", choices=KINDS, help="print this key alone")
    add_server_arguments(parser)
    args = parser.parse_args(argv)

    server = server_from_arguments(args)
    if args.only:
        print(key_entries(server.key_file)[args.only]["key"])
        return 0
    if args.renew:
        key_entries(server.key_file)  # a missing or unreadable file fails here, in one line
        for kind in RENEWABLE if args.renew == "both" else (args.renew,):
            server.refresh_key(kind)
        print("renewed:", ", ".join(RENEWABLE if args.renew == "both" else (args.renew,)), file=sys.stderr)
    print(describe(server.key_file))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
