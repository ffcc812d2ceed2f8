#!/usr/bin/env python3
"""Register a model archive from the model store through TorchServe's management API, with the management key.

    python scripts/register.py tiny-gpt2            # model_store/tiny-gpt2.mar, 1 worker, waits for it

Reads the key from <run-dir>/key_file.json; exits non-zero with TorchServe's own message when it fails.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gpt2ops import REPO

from gpt2ops.client import TorchServe, TorchServeError


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name")
    parser.add_argument("--archive", help="archive name in the model store (default: <model_name>.mar)")
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--config", default=str(REPO / "config.properties"))
    parser.add_argument("--run-dir", default=str(REPO / "run"))
    args = parser.parse_args(argv)

    server = TorchServe.from_config(args.config, args.run_dir)
    if not server.key_file.exists():
        print(f"error: {server.key_file} not found: is TorchServe running from {args.run_dir}?", file=sys.stderr)
        return 1
    try:
        answer = server.register(args.archive or f"{args.model_name}.mar", args.model_name, args.workers)
    except TorchServeError as err:
        print(f"error: {err}", file=sys.stderr)
        if err.status == 409:
            print(f"hint: {args.model_name} is registered already (DELETE {server.management_url}/models/"
                  f"{args.model_name} to replace it)", file=sys.stderr)
        return 1
    print(json.dumps(answer, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
