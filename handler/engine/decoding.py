"""The decoding engine: contrastive search, contrastive sampling, greedy and sampling in one batched loop.

A ladder of small functions in the style of gpt-fast's `generate.py`:

    generate -> prefill -> decode_n_tokens -> decode_one_token
                                               |- propose     top-k candidates (or the greedy / sampled token)
                                               |- model.candidates   one forward for all B*K candidates
                                               |- rank        contrastive score, handler.engine.ranking
                                               '- commit      winner's token, cache slot, hidden state, logits

Every mode runs through the same step: greedy and sampling rows are rows with a
single candidate, so a batch may mix modes and per-row parameters (alpha, k,
temperature, seed, eos, max_new_tokens), and a row's tokens do not depend on
its neighbours. The step works on the static buffers of `handler.engine.kv_cache`
with fixed shapes and no host synchronisation; the host looks at the tokens
only every `sync_every` steps, where it streams them, applies stop strings
(through `on_sync`) and stops early once every row has finished.

Contrastive search follows Su et al. 2022 and transformers <= 4.55: the winner's
logits (from the hidden state the candidate forward already computed) serve the
next step, so each step is one forward of B*K tokens. Unlike transformers, the
cache is not copied k times per row (see `handler.engine.kv_cache`), and only the
winner goes through the LM head.

No I/O here: tokenizer, text and HTTP live in the handler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import torch

from handler.engine.ranking import contrastive_scores, degeneration_penalty, select_candidates, unit
from handler.engine.kv_cache import DecodeBuffers, slots_needed
from handler.engine.params import GenerationParams
from handler.engine.sampling import STREAM_CONTRASTIVE, gumbel, sample_tokens

PAD_ID = 0  # fed to padding slots and finished rows; always masked out


@dataclass(frozen=True)
class RowRequest:
    """One prompt to continue: token ids and resolved parameters."""

    prompt_ids: Sequence[int]
    params: GenerationParams
    eos_ids: tuple[int, ...]  # end-of-text ids for this row (may be empty)
    seed: int = 0  # the sampler's seed, resolved by the caller when params.seed is None


@dataclass
class RowResult:
    tokens: list[int]
    finish_reason: str  # "eos" | "length" | "stop" | "timeout"


# on_sync(new_tokens) -> {row: tokens to keep}: called every `sync_every` steps with each
# unfinished row's tokens since the last call; rows it returns are finished ("stop"),
# keeping that many of their tokens in total.
SyncCallback = Callable[[list[list[int]]], Mapping[int, int]]


@dataclass
class RowSettings:
    """Per-row parameters as device tensors [B], plus what the whole batch needs."""

    alpha: torch.Tensor  # float32
    num_candidates: torch.Tensor  # long, 1 for greedy and sampling rows
    contrastive_sample: torch.Tensor  # bool
    sample_mode: torch.Tensor  # bool, decoding == "sample"
    temperature: torch.Tensor  # float32
    top_k: torch.Tensor  # long, sampling rows (0: off)
    top_p: torch.Tensor  # float32
    seed: torch.Tensor  # long
    max_new: torch.Tensor  # long
    eos: torch.Tensor  # [B, E] long, -1 padded
    k: int  # candidates per row in the step (max over rows)
    any_sample_mode: bool
    any_contrastive_sample: bool
    penalised: bool  # some row has alpha > 0 and k > 1: context hidden states are needed

    @classmethod
    def from_rows(cls, rows: Sequence[RowRequest], device) -> "RowSettings":
        ps = [r.params for r in rows]
        cands = [p.num_candidates for p in ps]
        contrastive = [p.decoding == "contrastive" for p in ps]
        sample_mode = [p.decoding == "sample" for p in ps]
        csample = [c and p.do_sample for c, p in zip(contrastive, ps)]
        alpha = [p.penalty_alpha if c else 0.0 for c, p in zip(contrastive, ps)]
        width = max(1, max(len(r.eos_ids) for r in rows))
        eos = [list(r.eos_ids) + [-1] * (width - len(r.eos_ids)) for r in rows]

        def tensor(values, dtype):
            return torch.tensor(values, dtype=dtype, device=device)

        return cls(
            alpha=tensor(alpha, torch.float32),
            num_candidates=tensor(cands, torch.long),
            contrastive_sample=tensor(csample, torch.bool),
            sample_mode=tensor(sample_mode, torch.bool),
            temperature=tensor([p.temperature for p in ps], torch.float32),
            top_k=tensor([p.top_k if s else 0 for p, s in zip(ps, sample_mode)], torch.long),
            top_p=tensor([p.top_p if s else 1.0 for p, s in zip(ps, sample_mode)], torch.float32),
            seed=tensor([r.seed for r in rows], torch.long),
            max_new=tensor([p.max_new_tokens for p in ps], torch.long),
            eos=tensor(eos, torch.long),
            k=max(cands),
            any_sample_mode=any(sample_mode),
            any_contrastive_sample=any(csample),
            penalised=any(a > 0 and k > 1 for a, k in zip(alpha, cands)),
        )


@dataclass
class DecodeState:
    """Everything that changes from step to step; tensors are updated in place."""

    buffers: DecodeBuffers
    logits: torch.Tensor  # [B, V] float32, for the next token
    positions: torch.Tensor  # [B] long, position id of the next token
    t: torch.Tensor  # long scalar: cache slot of the next token
    step: torch.Tensor  # long scalar: tokens generated so far
    lengths: torch.Tensor  # [B] long, tokens generated per row
    finished: torch.Tensor  # [B] bool
    hit_eos: torch.Tensor  # [B] bool
    prompt_len: int  # T, the padded prompt length
    host_step: int = 0  # the host's copy of `step` (no synchronisation needed to know it)
    host_tokens: list[list[int]] = field(default_factory=list)
    host_reasons: dict[int, str] = field(default_factory=dict)


# ---- the ladder ----


def left_pad(prompts: Sequence[Sequence[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts -> ids [B, T] left-padded with PAD_ID, valid [B, T] bool."""
    T = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), T), PAD_ID, dtype=torch.long)
    valid = torch.zeros((len(prompts), T), dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p):] = torch.tensor(list(p), dtype=torch.long)
        valid[i, T - len(p):] = True
    return ids.to(device), valid.to(device)


def prefill(model, ids: torch.Tensor, valid: torch.Tensor, settings: RowSettings, slots: int) -> DecodeState:
    """Run the prompts [B, T], fill the static buffers and return the state before the first token."""
    B, T = ids.shape
    buffers = DecodeBuffers.allocate(model, B, slots, contrastive=settings.penalised)
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)  # [B, T]
    hidden = model.prefill(ids, positions, valid, buffers.kv)  # [B, T, d]
    buffers.valid[:, :T] = valid
    buffers.tokens[:, :T] = ids
    if buffers.hidden is not None:
        buffers.hidden[:, :T] = unit(hidden)
    device = ids.device
    return DecodeState(
        buffers=buffers,
        logits=model.logits(hidden[:, -1]),  # [B, V]: the last slot is a real token in every row
        positions=valid.long().sum(1),  # [B]
        t=torch.tensor(T, device=device),
        step=torch.tensor(0, device=device),
        lengths=torch.zeros(B, dtype=torch.long, device=device),
        finished=torch.zeros(B, dtype=torch.bool, device=device),
        hit_eos=torch.zeros(B, dtype=torch.bool, device=device),
        prompt_len=T,
        host_tokens=[[] for _ in range(B)],
    )


def propose(state: DecodeState, settings: RowSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the next token: ids [B, K] and their probabilities [B, K].

    Contrastive rows: the k most likely tokens. Greedy rows: the most likely one
    (candidate 0). Sampling rows: the drawn token as candidate 0.
    """
    probs = state.logits.softmax(dim=-1)  # [B, V]
    cand_prob, cand = probs.topk(settings.k, dim=-1)  # [B, K]
    if settings.any_sample_mode:
        drawn = sample_tokens(
            state.logits, settings.temperature, settings.top_k, settings.top_p, settings.seed, state.step
        )  # [B]
        cand[:, 0] = torch.where(settings.sample_mode, drawn, cand[:, 0])
    return cand, cand_prob


def rank(state: DecodeState, settings: RowSettings, cand, cand_prob, cand_hidden) -> torch.Tensor:
    """Index [B] of the winning candidate of each row."""
    B, K = cand.shape
    if K == 1:
        return torch.zeros(B, dtype=torch.long, device=cand.device)
    cand_valid = torch.arange(K, device=cand.device)[None, :] < settings.num_candidates[:, None]  # [B, K]
    if settings.penalised:
        penalty = degeneration_penalty(unit(cand_hidden), state.buffers.hidden, state.buffers.valid)  # [B, K]
    else:
        penalty = torch.zeros_like(cand_prob)
    scores = contrastive_scores(cand_prob, penalty, settings.alpha)  # [B, K]
    noise = None
    if settings.any_contrastive_sample:
        noise = gumbel(settings.seed, state.step, cand, STREAM_CONTRASTIVE)  # [B, K]
    return select_candidates(scores, cand_valid, settings.contrastive_sample, settings.temperature, noise)


def commit(model, state: DecodeState, settings: RowSettings, cand, sel, cand_hidden) -> None:
    """Make each row's winner part of its sequence: token, cache slot t, context hidden state, next logits."""
    B, K = cand.shape
    buf = state.buffers
    t_idx = state.t.view(1)
    win = cand.gather(1, sel[:, None]).squeeze(1)  # [B]
    win = torch.where(state.finished, PAD_ID, win)
    buf.tokens.index_copy_(1, t_idx, win[:, None])
    if K > 1:  # candidate j sits at slot t + j: copy the winner's keys and values to slot t
        _, L, _, H, _, Dh = buf.kv.shape
        src = (state.t + sel).view(1, 1, B, 1, 1, 1).expand(2, L, B, H, 1, Dh)
        buf.kv.index_copy_(4, t_idx, buf.kv.gather(4, src))
    win_hidden = cand_hidden.gather(1, sel.view(B, 1, 1).expand(B, 1, cand_hidden.shape[-1]))  # [B, 1, d]
    if buf.hidden is not None:
        buf.hidden.index_copy_(1, t_idx, unit(win_hidden))
    buf.valid.index_fill_(1, t_idx, True)
    state.logits = model.logits(win_hidden[:, 0])  # [B, V]
    running = ~state.finished
    eos = (win[:, None] == settings.eos).any(dim=1) & running  # [B]
    state.lengths += running.long()
    state.hit_eos |= eos
    state.finished |= eos | (state.lengths >= settings.max_new)
    state.positions += 1
    state.t += 1
    state.step += 1


def decode_one_token(model, state: DecodeState, settings: RowSettings) -> None:
    """One decoding step for every row of the batch, in place."""
    cand, cand_prob = propose(state, settings)  # [B, K]
    B, K = cand.shape
    slots = state.t + torch.arange(K, device=cand.device)  # [K]
    cand_hidden = model.candidates(cand, state.positions, slots, state.buffers.valid, state.buffers.kv)  # [B, K, d]
    sel = rank(state, settings, cand, cand_prob, cand_hidden)  # [B]
    commit(model, state, settings, cand, sel, cand_hidden)
    state.host_step += 1


def sync(state: DecodeState, on_sync: SyncCallback | None) -> bool:
    """Bring the new tokens to the host, apply `on_sync`'s stops; True when every row is done."""
    lengths = state.lengths.tolist()
    finished = state.finished.tolist()
    hit_eos = state.hit_eos.tolist()
    have = [len(toks) for toks in state.host_tokens]
    lo = min((n for row, n in enumerate(have) if row not in state.host_reasons), default=0)
    block = state.buffers.tokens[:, state.prompt_len + lo: state.prompt_len + state.host_step].tolist()
    new: list[list[int]] = []
    for row, toks in enumerate(state.host_tokens):
        fresh = [] if row in state.host_reasons else block[row][have[row] - lo: lengths[row] - lo]
        toks.extend(fresh)
        new.append(fresh)
    stops = on_sync(new) if on_sync is not None else None
    if stops:
        for row, keep in stops.items():
            del state.host_tokens[row][keep:]
            state.host_reasons[row] = "stop"
            finished[row] = True
        rows = torch.tensor(sorted(stops), dtype=torch.long, device=state.finished.device)
        state.finished.index_fill_(0, rows, True)
    for row, done in enumerate(finished):
        if done and row not in state.host_reasons:
            state.host_reasons[row] = "eos" if hit_eos[row] else "length"
    return all(finished)


def decode_n_tokens(
    model,
    state: DecodeState,
    settings: RowSettings,
    max_steps: int,
    *,
    on_sync: SyncCallback | None = None,
    sync_every: int = 4,
    deadline: float | None = None,
) -> None:
    """Decode until every row finishes or `max_steps`; past `deadline` (time.monotonic) rows end as "timeout"."""
    for i in range(max_steps):
        decode_one_token(model, state, settings)
        if (i + 1) % sync_every == 0 or i + 1 == max_steps:
            if sync(state, on_sync):
                return
            if deadline is not None and time.monotonic() > deadline:
                for row in range(len(state.host_tokens)):
                    state.host_reasons.setdefault(row, "timeout")
                return


@torch.inference_mode()
def generate(
    model,
    rows: Sequence[RowRequest],
    *,
    on_sync: SyncCallback | None = None,
    sync_every: int = 4,
    deadline: float | None = None,
) -> list[RowResult]:
    """Continue every prompt of `rows` as a batch; one `RowResult` per row, in order."""
    if not rows:
        return []
    device = model.device
    settings = RowSettings.from_rows(rows, device)
    ids, valid = left_pad([r.prompt_ids for r in rows], device)
    max_new = max(r.params.max_new_tokens for r in rows)
    state = prefill(model, ids, valid, settings, slots_needed(ids.shape[1], max_new, settings.k))
    decode_n_tokens(model, state, settings, max_new, on_sync=on_sync, sync_every=sync_every, deadline=deadline)
    return [RowResult(toks, state.host_reasons[row]) for row, toks in enumerate(state.host_tokens)]
