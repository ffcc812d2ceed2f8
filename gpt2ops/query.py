#!/usr/bin/env python3
"""Send a prompt to a registered model and print the answer.

    .venv/bin/python scripts/query.py "你是谁?"
    .venv/bin/python scripts/query.py "Who are you?" --param max_new_tokens=32 --param decoding=greedy
    .venv/bin/python scripts/query.py "你好" --stream            # prints the text as it is generated
    .venv/bin/python scripts/query.py "你好" --json              # the whole JSON answer

`--param name=value` values are read as JSON where they parse (32, true, ["\\n"]), else as strings.
The inference key comes from <run-dir>/key_file.json (--run-dir, else $RUN_DIR, else run/) and is
refreshed once with the API key if it has expired. Failures are one line: no server at the address,
no key file, a key the server refuses, or the server's answer.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2ops.client import TorchServe, default_config, default_run_dir
from gpt2ops.errors import cli


def parse_param(text: str) -> tuple[str, object]:
    if "=" not in text:
        raise argparse.ArgumentTypeError(f"--param takes name=value, got {text!r}")
    name, value = text.split("=", 1)
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


@cli
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt")
    parser.add_argument("--model", default="tiny-gpt2")
    parser.add_argument("--param", type=parse_param, action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--stream", action="store_true", help="print the text as it arrives")
    parser.add_argument("--json", action="store_true", help="print the whole JSON answer")
    parser.add_argument("--config", default=default_config(), help="the server's config.properties "
                        "(default: $TS_CONFIG, else the repo's)")
    parser.add_argument("--run-dir", default=default_run_dir(), help="the directory the server was started from, "
                        "with key_file.json (default: $RUN_DIR, else run/)")
    args = parser.parse_args(argv)

    server = TorchServe.from_config(args.config, args.run_dir)
    params = dict(args.param)
    if args.stream:
        last = {}
        for chunk in server.stream(args.model, args.prompt, **params):
            print(chunk.get("text", ""), end="", flush=True)
            last = chunk
        print()
        if args.json:
            print(json.dumps(last, ensure_ascii=False, indent=2))
        return 0
    answer = server.generate(args.model, args.prompt, **params)
    print(json.dumps(answer, ensure_ascii=False, indent=2) if args.json else answer["full_text"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
