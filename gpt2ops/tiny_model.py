"""The small local GPT-2 used by `make run`, the README's examples and the tests: no network, deterministic from a seed.

A byte-level BPE tokenizer trained with `tokenizers` on the repo's Chinese +
English corpus (`data/corpus.txt`, one document per line, written for this
project), and a 2-layer GPT-2 (`GPT2Config`, 512 positions, 0.7M parameters)
*trained* on that corpus: a fixed number of AdamW steps on the CPU, about 25 s
on one core. The model learns much of its small corpus by heart, so it answers
"你是谁?" with readable text of the corpus' kind rather than random bytes, and
its decoding behaviour (greedy loops, contrastive search avoiding them) can be
measured with `benchmarks/quality.py`. `TrainingPlan(steps=0)` keeps the random
initial weights.

Everything around the weights (fp16 safetensors, tokenizer files, generation
config, loading with `from_pretrained`) is the same as for
IDEA-CCNL/Wenzhong-GPT2-110M.

Determinism: the same corpus, seed and plan give byte-identical files on the
same machine and torch build. Training pins `torch.set_num_threads(plan.threads)`,
draws every random number from generators seeded with `seed`, and runs with
`torch.use_deterministic_algorithms(True)`; all are restored afterwards.
Another CPU (say AVX-512 versus AVX2 kernels) may round differently.
"""

from __future__ import annotations

import logging
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

EOS = "<|endoftext|>"
TINY_DEFAULTS = {
    "seed": 1234,
    "vocab_size": 2048,  # at most: the BPE stops earlier on a small corpus (about 1,700 tokens on ours)
    "n_positions": 512,
    "n_embd": 192,
    # Two layers: on this budget they learn the corpus far faster than four (measured: after 330 steps
    # of 8 x 64 tokens, 4 layers of d=128 were at loss 1.3 with broken answers; these reach 0.2 in 400).
    # It has to learn the corpus well: while its next-token ranking is soft, contrastive search's
    # penalty on tokens already in the prompt (是 in 你是谁?) beats fluency and the answer falls apart.
    "n_layer": 2,
    "n_head": 4,
    # no dropout: the model is meant to learn its small corpus within a few hundred steps
    "resid_pdrop": 0.0,
    "embd_pdrop": 0.0,
    "attn_pdrop": 0.0,
}

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainingPlan:
    """How the tiny model is trained: a fixed number of steps (not a time limit), so that it is deterministic."""

    steps: int = 400  # optimizer steps; 0 leaves the random initial weights
    batch_size: int = 8  # blocks per step
    block: int = 64  # tokens per block (a document is 30 tokens on average)
    lr: float = 3e-3  # peak learning rate of AdamW
    warmup: int = 30  # steps of linear warm-up, then cosine decay to lr / 10
    weight_decay: float = 0.01
    clip: float = 1.0  # gradient norm clipping
    # torch intra-op threads while training. Fixed, since the thread count can change how CPU kernels
    # split their sums; and one, since two threads on a busy 2-core machine spin at every barrier
    # (measured: 5x slower than one thread while other jobs ran, about 1.7x faster on an idle machine).
    threads: int = 1


TRAINING = TrainingPlan()


def read_documents(corpus: Path) -> list[str]:
    """The corpus' documents: its non-empty lines."""
    return [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]


def train_tokenizer(corpus: Path, vocab_size: int):
    """Byte-level BPE (as GPT-2's) trained on `corpus`; returns a `GPT2TokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2TokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(read_documents(corpus), trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


@contextmanager
def deterministic_torch(threads: int):
    """Fixed thread count and deterministic kernels inside the block; the caller's settings come back after."""
    import torch

    saved_threads = torch.get_num_threads()
    saved_det = torch.are_deterministic_algorithms_enabled()
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.set_num_threads(saved_threads)
        torch.use_deterministic_algorithms(saved_det)


def epoch_blocks(docs: list[list[int]], eos_id: int, block: int, generator):
    """One pass over the documents in a seeded random order, packed into blocks of `block` tokens [N, block].

    Every block starts at the beginning of a document (as a prompt does at serving time) and goes
    on with the next documents, each followed by end-of-text; the document that overflows a block
    is cut there, and lands elsewhere in the next epoch.
    """
    import torch

    order = torch.randperm(len(docs), generator=generator).tolist()
    blocks, current = [], []
    for i in order:
        current.extend(docs[i] + [eos_id])
        if len(current) >= block:
            blocks.append(current[:block])
            current = []
    if current:  # the last, short block: fill it with the first documents of the order
        for i in order:
            if len(current) >= block:
                break
            current.extend(docs[i] + [eos_id])
        blocks.append(current[:block])
    return torch.tensor(blocks, dtype=torch.long)


def train(model, docs: list[list[int]], eos_id: int, *, seed: int, plan: TrainingPlan = TRAINING) -> list[float]:
    """Train `model` (float32, in place) for `plan.steps` AdamW steps; returns the loss of every step."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=plan.lr, weight_decay=plan.weight_decay,
                                  betas=(0.9, 0.95))

    def lr_at(step: int) -> float:
        if step < plan.warmup:
            return plan.lr * (step + 1) / plan.warmup
        progress = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
        return plan.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    model.train()
    losses: list[float] = []
    pending = torch.empty(0, plan.block, dtype=torch.long)
    start = time.monotonic()
    for step in range(plan.steps):
        while len(pending) < plan.batch_size:
            pending = torch.cat([pending, epoch_blocks(docs, eos_id, plan.block, generator)])
        batch, pending = pending[: plan.batch_size], pending[plan.batch_size:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), plan.clip)
        optimizer.step()
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == plan.steps:
            logger.info("step %d/%d  loss %.3f  %.1fs", step + 1, plan.steps, losses[-1], time.monotonic() - start)
    model.eval()
    return losses


def build_tiny_model(
    out: Path,
    *,
    corpus: Path,
    seed: int,
    dtype_name: str = "float16",
    plan: TrainingPlan = TRAINING,
) -> None:
    """Write the tiny model (trained per `plan`), its tokenizer and generation config to `out`."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    cfg = dict(TINY_DEFAULTS)
    tokenizer = train_tokenizer(corpus, cfg.pop("vocab_size"))
    cfg.pop("seed")
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, **cfg)
    docs = [tokenizer.encode(doc) for doc in read_documents(corpus)]
    with deterministic_torch(plan.threads):
        torch.manual_seed(seed)  # the initial weights (and dropout, drawn from the global generator)
        model = GPT2LMHeadModel(config)
        if plan.steps:
            train(model, docs, eos_id, seed=seed, plan=plan)
    model = model.to(getattr(torch, dtype_name)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out)
