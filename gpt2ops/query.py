#!/usr/bin/env python3
"""Send a prompt to a registered model and print the answer.

    .venv/bin/python scripts/query.py "你是谁?"
    .venv/bin/python scripts/query.py "Who are you?" --param max_new_tokens=32 --param decoding=greedy
    .venv/bin/python scripts/query.py "你好" --stream            # prints the text as it is generated
    .venv/bin/python scripts/query.py "你好" --json              # the whole JSON answer
    .venv/bin/python scripts/query.py "你好" --openai --param temperature=0 --param max_tokens=16
                                          # the same through the OpenAI-compatible API, with the official client

`--openai` sends the prompt to /predictions/<model>/<version>/v1/completions with the official `openai`
package (make venv installs it): every --param goes into the request body as it is (OpenAI's names, e.g.
max_tokens, temperature, n, and this package's, e.g. penalty_alpha, top_k); each choice's text is printed
after the prompt; --json prints the completion object (streamed: the last chunk).

`--param name=value` values are read as JSON where they parse (32, true, ["\\n"]), else as strings.
The inference key comes from <run-dir>/key_file.json (--run-dir, else $RUN_DIR, else run/) and is
refreshed once with the API key if it has expired. Failures are one line: no server at the address,
no key file, a key the server refuses, or the server's answer.
"""

from __future__ import annotations

import argparse
import json
import sys

from gpt2ops.client import KeyRejected, ServerUnreachable, TorchServe, START_HINT, add_server_arguments, key_hint, \
    server_from_arguments
from gpt2ops.errors import OpsError, cli


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
    parser.add_argument("--openai", action="store_true", help="through the OpenAI-compatible API "
                        "(<model>/<version>/v1/completions) with the official openai client")
    parser.add_argument("--version", default="1.0", help="the model version in the URL of --openai (default 1.0, "
                        "the archive's)")
    add_server_arguments(parser)
    args = parser.parse_args(argv)

    server = server_from_arguments(args)
    params = dict(args.param)
    if args.openai:
        return openai_query(server, args, params)
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


def openai_query(server: TorchServe, args, params: dict) -> int:
    """--openai: the official client against the OpenAI-compatible routes, with the inference key."""
    try:
        import openai
    except ImportError:
        raise OpsError("--openai needs the official `openai` package, which is not installed",
                       "install it into the project environment: make venv (or .venv/bin/python -m pip install openai)"
                       ) from None
    if "stream" in params:
        raise OpsError("--param stream=... is not for --openai", "use --stream")
    base_url = f"{server.inference_url}/predictions/{args.model}/{args.version}/v1"

    def complete(key: str):
        client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=server.timeout)
        return client.completions.create(model=args.model, prompt=args.prompt, stream=args.stream, extra_body=params)

    def refused(err: Exception) -> bool:  # TorchServe's 400 InvalidKeyException, not an OpenAI error body
        return isinstance(err, openai.BadRequestError) and isinstance(err.body, dict) \
            and err.body.get("type") == "InvalidKeyException"

    try:
        try:
            answer = complete(server.key("inference"))
        except openai.BadRequestError as err:
            if not refused(err):
                raise
            answer = complete(server.refresh_key("inference"))  # expired: renewed once with the API key
        if not args.stream:
            if args.json:
                print(answer.model_dump_json(indent=2))
            else:
                for choice in answer.choices:
                    print(args.prompt + choice.text)
            return 0
        last = None
        print(args.prompt, end="", flush=True)
        for chunk in answer:
            for choice in chunk.choices:
                print(choice.text, end="", flush=True)
            last = chunk
        print()
        if args.json and last is not None:
            print(last.model_dump_json(indent=2))
        return 0
    except openai.APIConnectionError:
        raise ServerUnreachable(f"no TorchServe answers at {server.inference_url}", START_HINT) from None
    except openai.APIStatusError as err:
        if refused(err):
            raise KeyRejected(err.status_code, err.response.text, f"the completion at {base_url}",
                              key_hint("inference", server.key_file)) from None
        detail = err.body.get("message", err.body) if isinstance(err.body, dict) else err.body
        raise OpsError(f"the completion at {base_url} failed: HTTP {err.status_code}: {detail}",
                       "fix the request (the message names the field)" if err.status_code < 500 else
                       f"see {server.run_dir / 'logs' / 'model_log.log'}") from None
    except openai.APIError as err:  # an error event in the stream
        raise OpsError(f"the completion at {base_url} failed while streaming: {err.message}",
                       f"see {server.run_dir / 'logs' / 'model_log.log'}") from None


if __name__ == "__main__":
    sys.exit(main())
