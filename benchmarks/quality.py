#!/usr/bin/env python3
"""Degeneration benchmark of the decoding modes: repetition, diversity, coherence and length per mode.

    .venv/bin/python -m benchmarks.quality                     # the tiny model of `make run` (built if missing)
    .venv/bin/python -m benchmarks.quality --model-dir DIR --max-new-tokens 256
    make quality

It measures the claim of Su et al. 2022, "A Contrastive Framework for Neural
Text Generation" (NeurIPS 2022, arXiv:2202.06417): greedy decoding degenerates
into repetition, sampling wanders, and contrastive search,

    x_t = argmax_{v in top-k}  (1 - alpha) * p(v | x_<t)  -  alpha * max_j cos(h_v, h_j),

repeats far less than greedy while staying coherent. Every prompt of a fixed
set is continued by every mode for a fixed number of tokens, as in the paper's
open-ended generation (end-of-text does not stop it: the model starts a new
document, and the repetition across documents is what greedy decoding suffers
from; `--stop-at-eos` stops there instead, as a request does by default).

Metrics (section 5.1 of the paper), over the generated token ids of all prompts:

- rep-n = 100 * (1 - unique n-grams / total n-grams), n = 2, 3, 4. Unique n-grams
  are counted per generation and summed over the prompts, as are the totals
  (an n-gram repeated *across* two generations is no repetition). The unit is
  the model's own BPE token, not a whitespace word (the corpus is half Chinese).
- diversity = (1 - rep-2/100) * (1 - rep-3/100) * (1 - rep-4/100).
- coherence: the mean log-probability of the generated tokens given the prompt,
  the measure of Su and Collier 2022 ("Contrastive Search Is What You Need For
  Neural Text Generation", arXiv:2210.14140), but judged by the generating model
  itself (no larger model is available offline): it favours greedy decoding by
  construction, so read it as "how far a mode strays from the model's own
  preferences", not as human judgement.
- corpus: % of the generated token 4-grams that occur in the training corpus
  (`--corpus`), a proxy for "readable text of the corpus' kind" on a model that
  has memorised much of its small corpus.
- len: mean tokens before the first end-of-text, i.e. what a request that stops
  at end-of-text (the default) returns.

Sampling modes draw with a fixed seed per prompt, so the table is reproducible.
The engine is reached through one function, `generate_tokens`.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import torch

from gpt2ops import REPO
from handler.engine.params import GenerationParams

DEFAULT_MODEL_DIR = REPO / "artifacts" / "models" / "tiny-gpt2"
DEFAULT_CORPUS = REPO / "data" / "corpus.txt"
EOS_MARK = " ⏎ "  # how end-of-text shows in the sample texts

# Half Chinese, half English; some open like a corpus document, some do not.
PROMPTS = (
    "今天的天气",
    "The weather",
    "你是谁?",
    "Who are you?",
    "我喜欢",
    "My mother",
    "周末的早上",
    "Every morning",
    "语言模型",
    "A language model",
    "冬天",
    "In winter",
    "服务器收到请求以后",
    "The server",
    "小明去",
    "Greedy search",
)


@dataclass(frozen=True)
class Mode:
    name: str
    params: GenerationParams


MODES = (
    Mode("greedy", GenerationParams(decoding="greedy")),
    Mode("top-k sampling k=40", GenerationParams(decoding="sample", top_k=40, do_sample=True)),
    Mode("top-p sampling p=0.95", GenerationParams(decoding="sample", top_p=0.95, do_sample=True)),
    *(
        Mode(f"contrastive a={alpha} k={k}", GenerationParams(decoding="contrastive", penalty_alpha=alpha, top_k=k))
        for k in (4, 8)
        for alpha in (0.4, 0.6, 0.8)
    ),
    # The temperature divides contrastive *scores* (differences of a few tenths), not logits: at the
    # default T=1 the draw among the k candidates is close to uniform.
    *(
        Mode(f"contrastive sampling a=0.6 k=4 T={t:g}", GenerationParams(
            decoding="contrastive", penalty_alpha=0.6, top_k=4, do_sample=True, temperature=t))
        for t in (1.0, 0.1)
    ),
)


def generate_tokens(model, prompt_ids: Sequence[int], params: GenerationParams, eos_ids: tuple[int, ...],
                    seed: int) -> list[int]:
    """The new tokens of one prompt: the only call into the decoding engine."""
    from handler.engine import Request, generate

    [result] = generate(model, [Request("quality", list(prompt_ids), params, tuple(eos_ids), seed)])
    return result.tokens


# ---- metrics ----


def ngram_counts(tokens: Sequence, n: int) -> tuple[int, int]:
    """(unique, total) n-grams of one sequence; a sequence shorter than n has none."""
    grams = [tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1)]
    return len(set(grams)), len(grams)


def rep_n(sequences: Sequence[Sequence], n: int) -> float:
    """rep-n in %: 100 * (1 - unique / total), both summed over the sequences; 0 when there is no n-gram."""
    unique = total = 0
    for seq in sequences:
        u, t = ngram_counts(seq, n)
        unique += u
        total += t
    return 100.0 * (1.0 - unique / total) if total else 0.0


def diversity(sequences: Sequence[Sequence]) -> float:
    """prod over n = 2, 3, 4 of (1 - rep-n / 100): 1 without a repeated n-gram, near 0 for one token over and over."""
    return math.prod(1.0 - rep_n(sequences, n) / 100.0 for n in (2, 3, 4))


def in_corpus(sequences: Sequence[Sequence], corpus_grams: set, n: int = 4) -> float:
    """% of the sequences' n-grams found in `corpus_grams`; 0 when there is no n-gram."""
    grams = [tuple(seq[i:i + n]) for seq in sequences for i in range(len(seq) - n + 1)]
    return 100.0 * sum(g in corpus_grams for g in grams) / len(grams) if grams else 0.0


def length_to_eos(tokens: Sequence[int], eos_ids: tuple[int, ...]) -> int:
    """Tokens before the first end-of-text (all of them if there is none)."""
    for i, tok in enumerate(tokens):
        if tok in eos_ids:
            return i
    return len(tokens)


@torch.inference_mode()
def coherence(hf_model, prompt_ids: Sequence[int], tokens: Sequence[int]) -> float:
    """Mean log-probability of `tokens` after `prompt_ids` under `hf_model` (natural log, <= 0)."""
    if not tokens:
        return 0.0
    ids = torch.tensor([list(prompt_ids) + list(tokens)])
    logp = hf_model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
    targets = ids[0, 1:]
    picked = logp.gather(1, targets[:, None])[:, 0]
    return picked[len(prompt_ids) - 1:].mean().item()


@torch.inference_mode()
def model_diagnostics(hf_model, model, prompt_ids: Sequence[Sequence[int]], max_new_tokens: int, k: int = 4) -> dict:
    """What contrastive search works with, measured along each prompt's greedy continuation.

    - self_similarity: mean cosine between the final hidden states of two different positions of
      a text (Su and Collier 2022's measure of isotropy: near 0 is isotropic, near 1 is not; the
      degeneration penalty needs it low).
    - top1_median: median probability of the most likely token, step by step.
    - others_mean: mean probability of candidates 2..k, the ones contrastive search may choose instead.
    """
    sims, top1, others = [], [], []
    params = GenerationParams(decoding="greedy", max_new_tokens=max_new_tokens)
    for ids in prompt_ids:
        seq = list(ids) + generate_tokens(model, ids, params, (), seed=0)
        out = hf_model(input_ids=torch.tensor([seq]), output_hidden_states=True)
        h = torch.nn.functional.normalize(out.hidden_states[-1][0].float(), dim=-1)  # [n, d]
        n = len(seq)
        sims.append(((h @ h.T).sum() - n) / (n * (n - 1)))
        top = out.logits[0, len(ids) - 1:-1].float().softmax(-1).topk(k, dim=-1).values  # [steps, k]
        top1.append(top[:, 0])
        others.append(top[:, 1:])
    return {
        "self_similarity": torch.stack(sims).mean().item(),
        "top1_median": torch.cat(top1).median().item(),
        "others_mean": torch.cat(others).mean().item(),
    }


def corpus_ngrams(tokenizer, corpus: Path, n: int = 4) -> set:
    """The token n-grams of the corpus, documents (lines) joined by end-of-text as in training."""
    ids: list[int] = []
    for line in corpus.read_text(encoding="utf-8").splitlines():
        if line.strip():
            ids += tokenizer.encode(line) + [tokenizer.eos_token_id]
    return {tuple(ids[i:i + n]) for i in range(len(ids) - n + 1)}


# ---- the run ----


@dataclass
class ModeResult:
    mode: Mode
    generations: list[list[int]]
    rep: dict[int, float]
    diversity: float
    coherence: float
    corpus: float
    length: float


def run(hf_model, model, tokenizer, *, prompts: Sequence[str] = PROMPTS, modes: Sequence[Mode] = MODES,
        max_new_tokens: int = 128, stop_at_eos: bool = False, corpus_grams: set | None = None) -> list[ModeResult]:
    """Continue every prompt with every mode; one `ModeResult` per mode, in order."""
    eos = (tokenizer.eos_token_id,)
    prompt_ids = [tokenizer.encode(p) for p in prompts]
    results = []
    for mode in modes:
        params = replace(mode.params, max_new_tokens=max_new_tokens)
        gens = [generate_tokens(model, ids, params, eos if stop_at_eos else (), seed=1000 + i)
                for i, ids in enumerate(prompt_ids)]
        results.append(ModeResult(
            mode=mode,
            generations=gens,
            rep={n: rep_n(gens, n) for n in (2, 3, 4)},
            diversity=diversity(gens),
            coherence=sum(coherence(hf_model, p, g) for p, g in zip(prompt_ids, gens)) / len(gens),
            corpus=in_corpus(gens, corpus_grams) if corpus_grams is not None else float("nan"),
            length=sum(length_to_eos(g, eos) for g in gens) / len(gens),
        ))
    return results


def render(tokenizer, tokens: Sequence[int], limit: int | None = None) -> str:
    """Readable text of generated tokens: end-of-text as ⏎, line breaks as spaces, cut at `limit` characters."""
    eos = tokenizer.eos_token_id
    pieces, current = [], []
    for tok in tokens:
        if tok == eos:
            pieces.append(tokenizer.decode(current, clean_up_tokenization_spaces=False))
            current = []
        else:
            current.append(tok)
    pieces.append(tokenizer.decode(current, clean_up_tokenization_spaces=False))
    text = EOS_MARK.join(pieces).replace("\n", " ")
    return text if limit is None or len(text) <= limit else text[: limit - 1] + "…"


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__} CPU, "
            f"float32, {torch.get_num_threads()} thread(s)")


def format_table(results: Sequence[ModeResult], tokenizer, *, header: Sequence[str], sample_prompt: str,
                 sample_index: int, sample_chars: int) -> str:
    name_w = max(len(r.mode.name) for r in results)
    lines = [*header, ""]
    lines.append(f"{'mode':<{name_w}}  rep-2  rep-3  rep-4  diversity  coherence  corpus   len")
    lines.append("-" * len(lines[-1]))
    for r in results:
        lines.append(f"{r.mode.name:<{name_w}}  {r.rep[2]:5.1f}  {r.rep[3]:5.1f}  {r.rep[4]:5.1f}  "
                     f"{r.diversity:9.3f}  {r.coherence:9.2f}  {r.corpus:5.1f}%  {r.length:4.1f}")
    lines += ["", f"Samples (prompt {sample_prompt!r}):"]
    for r in results:
        lines.append(f"  {r.mode.name:<{name_w}}  {render(tokenizer, r.generations[sample_index], sample_chars)}")
    return "\n".join(lines)


def load(model_dir: Path):
    """(hf_model, compact model, tokenizer) in float32 on the CPU, as `make run` serves it."""
    from transformers import AutoTokenizer

    from handler.engine.model import load_gpt2

    hf_model, model = load_gpt2(model_dir, torch.device("cpu"), torch.float32)
    return hf_model, model, AutoTokenizer.from_pretrained(model_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR,
                        help="saved GPT-2 folder (default: the tiny model of `make run`, built if missing)")
    parser.add_argument("--corpus", type=Path, default=DEFAULT_CORPUS, help="text for the corpus 4-gram column")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--prompts", type=int, default=len(PROMPTS), help="use the first N prompts of the set")
    parser.add_argument("--modes", nargs="*", help="only the modes whose name starts with one of these")
    parser.add_argument("--stop-at-eos", action="store_true", help="stop each generation at end-of-text")
    parser.add_argument("--sample", type=int, default=0, help="index of the prompt whose texts are shown")
    parser.add_argument("--sample-chars", type=int, default=160, help="cut sample texts at this many characters")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (one is fastest for the tiny model)")
    args = parser.parse_args(argv)
    if not 1 <= args.prompts <= len(PROMPTS):
        parser.error(f"--prompts must be in 1..{len(PROMPTS)}")
    if not 0 <= args.sample < args.prompts:
        parser.error(f"--sample must be in 0..{args.prompts - 1}")
    modes = [m for m in MODES if not args.modes or any(m.name.startswith(p) for p in args.modes)]
    if not modes:
        parser.error(f"no mode matches {args.modes}; modes: {[m.name for m in MODES]}")
    torch.set_num_threads(args.threads)

    if not (args.model_dir / "model.safetensors").exists():
        if args.model_dir != DEFAULT_MODEL_DIR:
            parser.error(f"{args.model_dir}/model.safetensors not found")
        from gpt2ops.tiny_model import TINY_DEFAULTS, build_tiny_model

        print(f"building the tiny model in {args.model_dir} ...", file=sys.stderr)
        build_tiny_model(args.model_dir, corpus=DEFAULT_CORPUS, seed=TINY_DEFAULTS["seed"])

    hf_model, model, tokenizer = load(args.model_dir)
    grams = corpus_ngrams(tokenizer, args.corpus) if args.corpus.exists() else None
    prompts = PROMPTS[: args.prompts]
    start = time.perf_counter()
    results = run(hf_model, model, tokenizer, prompts=prompts, modes=modes, max_new_tokens=args.max_new_tokens,
                  stop_at_eos=args.stop_at_eos, corpus_grams=grams)
    diag = model_diagnostics(hf_model, model, [tokenizer.encode(p) for p in prompts], args.max_new_tokens)
    config = hf_model.config
    header = [
        f"Decoding quality (Su et al. 2022 metrics) on {machine()}",
        f"model: {args.model_dir} ({config.n_layer} layers, d={config.n_embd}, vocab {config.vocab_size}, "
        f"{sum(p.numel() for p in hf_model.parameters()) / 1e6:.2f}M parameters)",
        f"{len(prompts)} prompts x {args.max_new_tokens} new tokens, "
        + ("stopping at end-of-text" if args.stop_at_eos else "end-of-text does not stop (fixed length)")
        + f"; {time.perf_counter() - start:.0f} s",
        "rep-n: % repeated token n-grams (lower: less repetition); diversity: prod(1 - rep-n/100); "
        "coherence: mean log p of the text under the model itself; corpus: % of token 4-grams found in the "
        "training corpus; len: mean tokens before the first end-of-text",
        f"along greedy text: hidden-state self-similarity {diag['self_similarity']:.2f} (isotropy: near 0 is "
        f"isotropic), top token's median p {diag['top1_median']:.2f}, candidates 2-4 mean p "
        f"{diag['others_mean']:.3f}",
    ]
    print(format_table(results, tokenizer, header=header, sample_prompt=prompts[args.sample],
                       sample_index=args.sample, sample_chars=args.sample_chars))
    return 0


if __name__ == "__main__":
    sys.exit(main())
