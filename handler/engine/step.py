"""One decoding step over the slot pool, and the prefill that puts a request into a slot.

Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"), contrastive sampling, greedy decoding and sampling as a ladder of
small functions in the style of gpt-fast's `generate.py`:

    prefill_slot                  a prompt alone -> its slot's cache, context, first logits
    decode_one_token              one step for every slot of a view of the pool
      |- propose                  top-K candidates (or the greedy / sampled token as candidate 0)
      |- model.candidates         one forward for all R*K candidates
      |- rank_values              contrastive score (handler.engine.ranking); the winner is its argmax
      '- commit                   winner's token, cache position, hidden state, next logits; eos and length

Every mode runs through the same step: greedy and sampling slots are slots with
a single candidate, so slots of every mode and their own parameters (alpha, k,
temperature, seed, eos, max_new_tokens) share it, and a slot's tokens do not
depend on its neighbours: each row of every matmul is computed alone, and the
step's shape depends only on the bucket it runs in (see `handler.engine.pool`).

The step is a function of tensors: no host synchronisation, no Python branch on
a tensor's value, every buffer a view of the pool (fixed addresses), its shape
(R slots, K candidates, sampling or not) fixed per call: what `torch.compile`
with `fullgraph=True` and CUDA graphs need.

As in transformers <= 4.55, the winner's logits (from the hidden state the
candidate forward already computed) serve the next step, so each step is one
forward of R*K tokens; only the winner goes through the LM head.
"""

from __future__ import annotations

import torch

from handler.engine.pool import EOS_WIDTH, PoolView, SlotPool
from handler.engine.ranking import choice_values, contrastive_scores, degeneration_penalty, unit
from handler.engine.sampling import STREAM_CONTRASTIVE, gumbel, sample_tokens

PAD_ID = 0  # the token finished and free slots feed; never attended to


def prefill_slot(model, pool: SlotPool, slot: int, prompt_ids: list[int], params, eos_ids, seed: int) -> None:
    """Run a prompt alone (no padding, its own length) into `slot` and set the slot's parameters.

    Whatever else is in the pool, the slot's cache, context and first logits
    depend on this prompt only.
    """
    device, T = pool.kv.device, len(prompt_ids)
    ids = torch.tensor([prompt_ids], dtype=torch.long, device=device)  # [1, T]
    positions = torch.arange(T, device=device)[None]  # [1, T]
    valid = torch.ones(1, T, dtype=torch.bool, device=device)
    hidden = model.prefill(ids, positions, valid, pool.kv[:, :, slot:slot + 1])  # [1, T, d]
    pool.hidden[slot, :T] = unit(hidden[0].float())
    pool.valid[slot] = False
    pool.valid[slot, :T] = True
    pool.logits[slot] = model.logits(hidden[0, -1:])[0]
    state = pool.state
    state.next_pos[slot] = T
    state.generated[slot] = 0
    state.hit_eos[slot] = False
    write_params(pool, slot, params, eos_ids, seed)
    state.finished[slot] = False  # last: the slot is live from here on


def write_params(pool: SlotPool, slot: int, params, eos_ids, seed: int) -> None:
    """The request's parameters into the slot's row of `pool.params`."""
    p = pool.params
    contrastive = params.decoding == "contrastive"
    sample_mode = params.decoding == "sample"
    p.alpha[slot] = params.penalty_alpha if contrastive else 0.0
    p.num_candidates[slot] = params.num_candidates
    p.contrastive_sample[slot] = contrastive and params.do_sample
    p.sample[slot] = sample_mode
    p.temperature[slot] = params.temperature
    p.top_k[slot] = params.top_k if sample_mode else 0
    p.top_p[slot] = params.top_p if sample_mode else 1.0
    p.seed[slot] = seed
    p.max_new[slot] = params.max_new_tokens
    eos = list(eos_ids)[:EOS_WIDTH]
    p.eos[slot] = torch.tensor(eos + [-1] * (EOS_WIDTH - len(eos)), dtype=torch.long)


def propose(view: PoolView, K: int, sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the next token: ids [R, K] and their probabilities [R, K].

    Contrastive slots: the K most likely tokens. Greedy slots: the most likely
    one (candidate 0). Sampling slots: the drawn token as candidate 0.
    """
    probs = view.logits.softmax(dim=-1)  # [R, V]
    cand_prob, cand = probs.topk(K, dim=-1)  # [R, K]
    if sampling:
        p = view.params
        drawn = sample_tokens(view.logits, p.temperature, p.top_k, p.top_p, p.seed, view.state.generated)  # [R]
        cand[:, 0] = torch.where(p.sample, drawn, cand[:, 0])
    return cand, cand_prob


def rank(view: PoolView, cand: torch.Tensor, cand_prob: torch.Tensor, cand_hidden: torch.Tensor) -> torch.Tensor:
    """Index [R] of each slot's winning candidate, from the float32 contrastive score."""
    return rank_values(view, cand, cand_prob, cand_hidden).argmax(dim=-1)


def rank_values(view: PoolView, cand: torch.Tensor, cand_prob: torch.Tensor, cand_hidden: torch.Tensor
                ) -> torch.Tensor:
    """[R, K] float32 values each slot's winning candidate is the argmax of: the contrastive score (Gumbel-perturbed
    for contrastive sampling), -inf past the slot's k (the self-check reads its margins)."""
    R, K = cand.shape
    p = view.params
    cand_valid = torch.arange(K, device=cand.device)[None, :] < p.num_candidates[:, None]  # [R, K]
    ctx_valid = view.valid[:, : view.scratch]  # [R, max_len]: the context, not the candidates' scratch
    penalty = degeneration_penalty(unit(cand_hidden.float()), view.hidden, ctx_valid)  # [R, K]
    scores = contrastive_scores(cand_prob, penalty, p.alpha)  # [R, K]
    noise = gumbel(p.seed, view.state.generated, cand, STREAM_CONTRASTIVE)  # [R, K]
    return choice_values(scores, cand_valid, p.contrastive_sample, p.temperature, noise)


def commit(model, view: PoolView, cand: torch.Tensor, sel: torch.Tensor, cand_hidden: torch.Tensor) -> None:
    """Make each slot's winner part of its sequence: token, cache position, context state, next logits."""
    R, K = cand.shape
    st, p = view.state, view.params
    running = ~st.finished  # [R]
    win = torch.where(running, cand.gather(1, sel[:, None]).squeeze(1), PAD_ID)  # [R]
    max_len = view.scratch
    pos = st.next_pos.clamp(max=max_len - 1)  # [R]; only finished slots could point past the end
    # the winner's keys and values: from its scratch position to the slot's next position
    _, L, _, H, _, Dh = view.kv.shape
    src = (max_len + sel).view(1, 1, R, 1, 1, 1).expand(2, L, R, H, 1, Dh)
    dst = pos.view(1, 1, R, 1, 1, 1).expand(2, L, R, H, 1, Dh)
    view.kv.scatter_(4, dst, view.kv.gather(4, src))
    win_hidden = cand_hidden.gather(1, sel.view(R, 1, 1).expand(R, 1, cand_hidden.shape[-1]))[:, 0]  # [R, d]
    view.hidden.scatter_(1, pos.view(R, 1, 1).expand(R, 1, view.hidden.shape[-1]), unit(win_hidden.float())[:, None])
    view.valid.scatter_(1, pos[:, None], running[:, None] | view.valid.gather(1, pos[:, None]))
    view.tokens.scatter_(1, st.generated[:, None], win[:, None])
    view.logits.copy_(model.logits(win_hidden))  # [R, V]
    eos = (win[:, None] == p.eos).any(dim=1) & running  # [R]
    st.generated += running.long()
    st.next_pos += running.long()
    st.hit_eos |= eos
    st.finished |= eos | (st.generated >= p.max_new)


def decode_one_token(model, view: PoolView, K: int, sampling: bool) -> torch.Tensor:
    """One step for every slot of `view` (finished and free slots run too and stay unchanged), in place.

    K: candidates per slot (a bucket >= every slot's k); sampling: whether some
    slot samples (the [R, V] sort is skipped otherwise). Returns the ranking's values [R, K] (what the
    winner is the argmax of; the compiled step discards them).
    """
    cand, cand_prob = propose(view, K, sampling)  # [R, K]
    scratch = view.scratch + torch.arange(K, device=cand.device)  # [K]: candidate j at max_len + j
    positions = view.state.next_pos.clamp(max=model.n_positions - 1)  # [R]
    cand_hidden = model.candidates(cand, positions, scratch, view.valid, view.kv)  # [R, K, d]
    values = rank_values(view, cand, cand_prob, cand_hidden)  # [R, K]
    commit(model, view, cand, values.argmax(dim=-1), cand_hidden)
    return values
