"""The decoding engine: GPT-2 forward, persistent slot pool, per-step scheduler, contrastive ranking, sampling.

No TorchServe here (the handler in `handler.gpt2_handler` adapts TorchServe to it). Modules:

- `model`      a compact GPT-2 forward over the pool's cache, on a Hugging Face model's weights
- `pool`       the buffers allocated once at start: KV cache, context hidden states, token slots, per-slot state
- `step`       prefill of one request into a slot; one decode step over the pool (the gpt-fast ladder)
- `compiled`   the fast path: that step compiled (fullgraph), replayed from CUDA graphs; its memory and release
- `fast_path`  whether it serves: the step-by-step self-check against eager, the switch, faults while serving
- `precision`  float32 matmul precision owned by the package (TorchServe's import turns TF32 on)
- `ranking`    contrastive search's score (Su et al. 2022, "A Contrastive Framework for Neural Text Generation")
- `sampling`   counter-based random draws: a seed gives the same text whatever shares the pool
- `scheduler`  the scheduler, pure: waiting queue, slot assignment, which requests finish (no model, no tensors)
- `runner`     the pool, the model and the decode step, carrying out the scheduler's outputs
- `core`       `Engine`: the scheduler and the runner driven step by step (continuous batching, warm-up)
- `stopping`   why a generation ends (`FinishReason`), decided in one place
- `params`     `GenerationParams`: what one request asks for (penalties, logit_bias, min_tokens, logprobs included)
- `logprobs`   `TokenLogprob`: a token's logprob and its most likely alternatives, as the engine hands them out
- `text`       tokens to text: stop strings, settled increments for streaming
"""

from handler.engine.logprobs import TokenLogprob
from handler.engine.params import GenerationParams
from handler.engine.pool import PoolShape
from handler.engine.core import Engine, generate
from handler.engine.scheduler import Generation, Request
from handler.engine.stopping import FinishReason

__all__ = ["Engine", "FinishReason", "Generation", "GenerationParams", "PoolShape", "Request", "TokenLogprob", "generate"]
