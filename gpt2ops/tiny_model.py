"""The small local GPT-2 used by `make run` and the tests: no network, deterministic from a seed.

Random weights from a `GPT2Config` (a few layers, 512 positions) and a byte-level
BPE tokenizer trained with `tokenizers` on the repo's small Chinese + English
corpus. The text it writes is noise; everything around it (fp16 safetensors,
tokenizer files, generation config, loading with `from_pretrained`) is the same
as for IDEA-CCNL/Wenzhong-GPT2-110M.
"""

from __future__ import annotations

from pathlib import Path

EOS = "<|endoftext|>"
TINY_DEFAULTS = {
    "seed": 1234,
    "vocab_size": 2048,
    "n_positions": 512,
    "n_embd": 128,
    "n_layer": 4,
    "n_head": 4,
    # larger than GPT-2's 0.02 so that random logits are not nearly uniform: next-token
    # distributions have a clear top, as a trained model's do
    "initializer_range": 0.1,
}


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
    lines = [line for line in corpus.read_text(encoding="utf-8").splitlines() if line.strip()]
    tok.train_from_iterator(lines, trainer=trainer)
    return GPT2TokenizerFast(tokenizer_object=tok, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def build_tiny_model(out: Path, *, corpus: Path, seed: int, dtype_name: str = "float16") -> None:
    """Write the tiny model, its tokenizer and generation config to `out`."""
    import torch
    from transformers import GenerationConfig, GPT2Config, GPT2LMHeadModel

    cfg = dict(TINY_DEFAULTS)
    tokenizer = train_tokenizer(corpus, cfg.pop("vocab_size"))
    cfg.pop("seed")
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    config = GPT2Config(vocab_size=len(tokenizer), bos_token_id=eos_id, eos_token_id=eos_id, **cfg)
    torch.manual_seed(seed)
    model = GPT2LMHeadModel(config).to(getattr(torch, dtype_name)).eval()
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    GenerationConfig(bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=eos_id).save_pretrained(out)
