"""The handler in-process, as a worker runs it, for the tests of tests/serving: built through a TorchServe
context, driven by `tests.ts_context.Frontend`, and checked against the engine run alone."""

from __future__ import annotations

import json
from contextlib import contextmanager

import torch

from gpt2ops.local_server import model_config
from handler.engine import Request, generate
from handler.engine.text import detokenizer
from handler.gpt2_handler import ContrastiveGPT2Handler
from handler.serving.fields import params_from_request
from tests.ts_context import Frontend, make_context

LIMITS = {"max_prompt_tokens": 64, "max_new_tokens": 96}  # the shared handlers' (tests/serving/conftest.py)


def make_handler(model_dir, **overrides) -> ContrastiveGPT2Handler:
    """A handler initialised as the worker does it, with a frontend that keeps its context."""
    context = make_context(model_dir, model_config(**overrides))
    h = ContrastiveGPT2Handler()
    h.initialize(context)
    h.frontend = Frontend(h, context)
    return h


def run(handler, bodies, headers=None, **kw):
    """Requests through the frontend; returns (statuses, last JSON object of each answer, chunks per request)."""
    codes, texts, chunks = handler.frontend.serve(bodies, headers, **kw)
    answers = []
    for text in texts:
        lines = [json.loads(line) for line in text.splitlines() if line.strip()]
        answers.append(lines[-1] if lines else None)
    return codes, answers, chunks


def local(handler, prompt, **fields):
    """What the engine gives for one prompt alone, outside the handler."""
    params = params_from_request(fields, defaults=handler.settings.defaults, limits=handler.settings.limits,
                                           vocab_size=handler.loaded.model.vocab_size)
    ids = handler.loaded.tokenizer.encode(prompt)
    request = Request("local", ids, params, params.end_ids(handler.loaded.eos_ids), params.seed or 0)
    return generate(handler.loaded.model, [request], detokenize=detokenizer(handler.loaded.tokenizer))[0]


@contextmanager
def one_torch_thread():
    """One torch thread while a module's handler serves: on a busy 2-core machine two threads make each of
    the tiny model's matrix products some 40 times slower (they wait for each other)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
