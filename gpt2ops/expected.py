"""The answers a served model must give, computed in-process: the load test and the end-to-end tests check
every answer against these, token for token.

The same engine (`handler.engine`) on the same weights, float32 on the CPU like the test server, each
request alone in its own pool: the engine's answers do not depend on what shares the pool, so a served
answer must equal this one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from handler.engine import Request, generate
from handler.engine.model import load_gpt2
from handler.engine.params import GenerationParams
from handler.serving.fields import params_from_request
from handler.serving.limits import RequestLimits
from handler.engine.text import detokenizer


@dataclass(frozen=True)
class Expected:
    tokens: list[int]
    text: str
    finish_reason: str


class ExpectedAnswers:
    """Expected answers for request bodies (`{"prompt": ..., **fields}`) on the model in `model_dir`."""

    def __init__(self, model_dir: str | Path, *, defaults: GenerationParams | None = None,
                 limits: RequestLimits | None = None):
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        _, self.model = load_gpt2(model_dir, torch.device("cpu"), torch.float32)
        self.detokenize = detokenizer(self.tokenizer)
        self.defaults = defaults or GenerationParams()
        self.limits = limits or RequestLimits()

    def __call__(self, body: dict) -> Expected:
        fields = {k: v for k, v in body.items() if k not in ("prompt", "return_token_ids", "stream")}
        params = params_from_request(fields, defaults=self.defaults, limits=self.limits,
                                               vocab_size=self.model.vocab_size)
        request = Request("expected", self.tokenizer.encode(body["prompt"]), params,
                          params.end_ids((self.tokenizer.eos_token_id,)), params.seed or 0)
        [gen] = generate(self.model, [request], detokenize=self.detokenize)
        return Expected(list(gen.tokens), gen.text.text(), str(gen.finish_reason))
