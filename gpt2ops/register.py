#!/usr/bin/env python3
"""Register a model archive from the model store through TorchServe's management API, with the management key.

    .venv/bin/python scripts/register.py tiny-gpt2             # model_store/tiny-gpt2.mar, 1 worker, waits for it
    .venv/bin/python scripts/register.py tiny-gpt2 --replace   # unregister it first when it is registered

Reads the key from <run-dir>/key_file.json (--run-dir, else $RUN_DIR, else run/). When the worker
cannot start, the error line quotes the worker's own message from <run-dir>/logs/model_log.log
(TorchServe itself answers only "Failed to start workers").
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2ops.client import add_server_arguments, server_from_arguments
from gpt2ops.errors import cli


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model_name")
    parser.add_argument("--archive", help="archive name in the model store (default: <model_name>.mar)")
    parser.add_argument("--workers", type=int, default=1,
                        help="workers of the model; the supported shape is 1 per GPU (the engine batches inside "
                             "it; TorchServe 0.12.0's continuous batching can stall one worker while another "
                             "waits: docs/engine.md, Traps)")
    parser.add_argument("--replace", action="store_true",
                        help="when the model is registered already, unregister it and register the archive again")
    add_server_arguments(parser)
    args = parser.parse_args(argv)

    if args.workers > 1:
        print(f"warning: {args.workers} workers of one model: the supported shape is one worker per model per GPU "
              "(under continuous batching TorchServe 0.12.0 can stall a busy worker while another waits for "
              "work; docs/engine.md, Traps)", file=sys.stderr)
    server = server_from_arguments(args)
    archive = args.archive or f"{args.model_name}.mar"
    replaced = args.replace and server.is_registered(args.model_name)
    if replaced:
        server.unregister(args.model_name)
    answer = server.register(archive, args.model_name, args.workers)
    if replaced:
        print(f"{args.model_name} was registered already: replaced it with {archive} "
              f"(the server, its keys and its other models are unchanged)", file=sys.stderr)
    print(json.dumps(answer, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
