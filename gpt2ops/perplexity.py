"""The perplexity of a text under the served model, through the OpenAI-compatible API, in one request.

    .venv/bin/python -m gpt2ops.perplexity FILE [--model tiny-gpt2]

It sends `{"prompt": <the text>, "echo": true, "max_tokens": 0, "logprobs": 0}` to `v1/completions`: the
server scores the prompt and generates nothing, and the answer's `logprobs.token_logprobs` are the log
probabilities of the text's tokens under the model's own distribution (the first token has none: nothing
comes before it). Perplexity = exp(−mean of the others), as transformers computes it from the loss with
the text as its own labels. The text must fit one request (`limits.max_prompt_tokens`, 256 as shipped);
the server says so with a 400 otherwise. The key and address: as scripts/query.py finds them (--run-dir,
else $RUN_DIR, else run/; --config, else $TS_CONFIG, else the repo's config.properties).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import requests

from gpt2ops.client import add_server_arguments, server_from_arguments
from gpt2ops.errors import OpsError


def score(base_url: str, key: str, model: str, text: str, timeout: float = 120) -> list[float | None]:
    """The text's token logprobs as the server computes them (the first one None)."""
    r = requests.post(f"{base_url}/completions", headers={"Authorization": f"Bearer {key}"}, timeout=timeout,
                      json={"model": model, "prompt": text, "echo": True, "max_tokens": 0, "logprobs": 0})
    if r.status_code != 200:
        raise OpsError(f"the server answered {r.status_code}: {r.text[:500]}")
    return r.json()["choices"][0]["logprobs"]["token_logprobs"]


def perplexity(logprobs: list[float | None]) -> float:
    """exp(−mean logprob) of the tokens that have one (all but the first)."""
    scored = [lp for lp in logprobs if lp is not None]
    if not scored:
        raise OpsError("the text is one token: it has no token to score (the first has nothing before it)")
    return math.exp(-sum(scored) / len(scored))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("file", type=Path, help="the text (UTF-8)")
    parser.add_argument("--model", default="tiny-gpt2", help="the served model's name (default tiny-gpt2)")
    parser.add_argument("--version", default="1.0", help="the model version in the URL (default 1.0)")
    parser.add_argument("--json", action="store_true", help="print tokens, scored tokens and perplexity as JSON")
    add_server_arguments(parser)
    args = parser.parse_args(argv)
    try:
        server = server_from_arguments(args)
        text = args.file.read_text(encoding="utf-8")
        base = f"{server.inference_url}/predictions/{args.model}/{args.version}/v1"
        logprobs = score(base, server.key("inference"), args.model, text)
        ppl = perplexity(logprobs)
    except (OpsError, OSError, requests.RequestException) as err:
        print(f"perplexity: {err}", file=sys.stderr)
        return 1
    if args.json:
        import json

        print(json.dumps({"tokens": len(logprobs), "scored": len(logprobs) - 1, "perplexity": ppl}))
    else:
        print(f"{ppl:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
