"""One decoding step over the slot pool, and the prefill that puts a request into a slot.

Contrastive search (Su et al. 2022, "A Contrastive Framework for Neural Text
Generation"), contrastive sampling, greedy decoding and sampling as a ladder of
small functions in the style of gpt-fast's `generate.py`:

    prefill_slot                  a prompt alone -> its slot's cache, context, first logits
    decode_one_token              one step for every slot of a view of the pool
      |- processed_logits         (extras) logit_bias, penalties, min_tokens: per row, before any choice
      |- propose                  top-K candidates (or the greedy / sampled token as candidate 0)
      |- model.candidates         one forward for all R*K candidates
      |- rank_values              contrastive score (handler.engine.ranking); the winner is its argmax
      |- record_logprobs          (extras) the winner's logprob and the most likely alternatives
      '- commit                   winner's token, cache position, hidden state, next logits; eos and length

Every mode runs through the same step: greedy and sampling slots are slots with
a single candidate, so slots of every mode and their own parameters (alpha, k,
temperature, seed, eos, max_new_tokens) share it, and a slot's tokens do not
depend on its neighbours: each row of every matmul is computed alone, and the
step's shape depends only on the bucket it runs in (see `handler.engine.pool`).

The step is a function of tensors: no host synchronisation, no Python branch on
a tensor's value, every buffer a view of the pool (fixed addresses), its shape
(R slots, K candidates, sampling or not, extras or not) fixed per call: what
`torch.compile` with `fullgraph=True` and CUDA graphs need.

`extras` is on when some live slot asks for logits processing (penalties,
logit_bias, min_tokens) or logprobs: only then does the step process the
logits, keep the token counts and write logprobs, so a batch that asks for
none of it runs the step it ran before they existed. With `extras` on, a row
that asks for nothing gets its logits through operations that leave every bit
as it was (x / 1, x * 1, x - 0, x + 0), so its tokens are the same either way.

As in transformers <= 4.55, the winner's logits (from the hidden state the
candidate forward already computed) serve the next step, so each step is one
forward of R*K tokens; only the winner goes through the LM head.
"""

from __future__ import annotations

import torch

from handler.engine.logprobs import TokenLogprob, token_logprobs
from handler.engine.pool import EOS_WIDTH, LOGPROBS_WIDTH, PoolView, SlotPool
from handler.engine.ranking import choice_values, contrastive_scores, degeneration_penalty, unit
from handler.engine.sampling import STREAM_CONTRASTIVE, gumbel, sample_tokens

PAD_ID = 0  # the token finished and free slots feed; never attended to
PROMPT_LOGPROBS_CHUNK = 16  # prompt positions whose logits exist at once (prompt_logprobs): bounds the prefill's
# memory to CHUNK x V x 4 bytes twice, whatever the prompt's length (handler.memory.plan counts it)


def prefill_slot(model, pool: SlotPool, slot: int, prompt_ids: list[int], params, eos_ids, seed: int
                 ) -> list[TokenLogprob | None]:
    """Run a prompt alone (no padding, its own length) into `slot` and set the slot's parameters; returns the
    prompt's logprobs when the request asks for them (else []).

    Whatever else is in the pool, the slot's cache, context and first logits
    depend on this prompt only. With max_new_tokens=0 (scoring the prompt) the
    slot is left finished: it never decodes.
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
    pool.seen[slot] = False
    pool.seen[slot].index_fill_(0, ids[0], True)
    pool.counts[slot] = 0.0
    scored = [] if params.prompt_logprobs is None else prompt_logprobs(model, hidden[0], ids[0], params.prompt_logprobs)
    state = pool.state
    state.next_pos[slot] = T
    state.generated[slot] = 0
    state.hit_eos[slot] = False
    write_params(pool, slot, params, eos_ids, seed)
    state.finished[slot] = params.max_new_tokens == 0  # last: the slot is live from here on (unless scoring only)
    return scored


def prompt_logprobs(model, hidden: torch.Tensor, ids: torch.Tensor, n: int) -> list[TokenLogprob | None]:
    """Each prompt token's raw logprob given the tokens before it, with the `n` most likely alternatives; the
    first token has none (None). hidden [T, d] final-norm states; ids [T]."""
    T = ids.shape[0]
    out: list[TokenLogprob | None] = [None]
    for start in range(0, T - 1, PROMPT_LOGPROBS_CHUNK):
        stop = min(start + PROMPT_LOGPROBS_CHUNK, T - 1)
        lp = model.logits(hidden[start:stop]).log_softmax(dim=-1)  # [c, V]: position i predicts token i + 1
        following = ids[start + 1: stop + 1]
        chosen = lp.gather(1, following[:, None])[:, 0]
        top_values, top_ids = lp.topk(n, dim=-1)
        out += token_logprobs(following.tolist(), chosen.tolist(), top_ids.tolist(), top_values.tolist(), n)
    return out


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
    p.repetition[slot] = params.repetition_penalty
    p.presence[slot] = params.presence_penalty
    p.frequency[slot] = params.frequency_penalty
    p.min_tokens[slot] = params.min_tokens
    p.bias_ids[slot] = 0  # padding: id 0, bias 0.0 adds nothing
    p.bias_values[slot] = 0.0
    if params.logit_bias:
        n = len(params.logit_bias)
        p.bias_ids[slot, :n] = torch.tensor([i for i, _ in params.logit_bias], dtype=torch.long)
        p.bias_values[slot, :n] = torch.tensor([b for _, b in params.logit_bias], dtype=torch.float32)
    p.lp_processed[slot] = params.logprobs_source == "processed"


def processed_logits(view: PoolView) -> torch.Tensor:
    """[R, V]: each row's next-token logits after its logit_bias, repetition_penalty (over prompt and generated
    tokens, as transformers' RepetitionPenaltyLogitsProcessor), frequency and presence penalties (over generated
    tokens, OpenAI's definition) and, before min_tokens generated tokens, its end-of-text ids at -inf.

    Per row, with the row's own parameters; a row that asks for none of it keeps its logits bit for bit.
    """
    p = view.params
    logits = view.logits.scatter_add(1, p.bias_ids, p.bias_values)  # padding adds 0.0
    rep = p.repetition[:, None]
    logits = torch.where(view.seen, torch.where(logits < 0, logits * rep, logits / rep), logits)
    logits = logits - p.frequency[:, None] * view.counts - p.presence[:, None] * (view.counts > 0).float()
    early = (view.state.generated < p.min_tokens)[:, None] & (p.eos >= 0)  # [R, EOS_WIDTH]
    mask = torch.where(early, float("-inf"), 0.0)  # -inf + x is -inf; padding (-1 -> id 0) adds 0.0
    return logits.scatter_add(1, p.eos.clamp(min=0), mask)


def propose(view: PoolView, logits: torch.Tensor, K: int, sampling: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Candidates for the next token from `logits` [R, V] (the slots' own, or processed): ids [R, K] and their
    probabilities [R, K].

    Contrastive slots: the K most likely tokens. Greedy slots: the most likely
    one (candidate 0). Sampling slots: the drawn token as candidate 0.
    """
    probs = logits.softmax(dim=-1)  # [R, V]
    cand_prob, cand = probs.topk(K, dim=-1)  # [R, K]
    if sampling:
        p = view.params
        drawn = sample_tokens(logits, p.temperature, p.top_k, p.top_p, p.seed, view.state.generated)  # [R]
        cand[:, 0] = torch.where(p.sample, drawn, cand[:, 0])
    return cand, cand_prob


def record_logprobs(view: PoolView, processed: torch.Tensor, cand: torch.Tensor, sel: torch.Tensor) -> None:
    """At each slot's generated position: the winner's logprob and the LOGPROBS_WIDTH most likely (id, logprob),
    from the raw logits or (lp_processed) the processed ones, divided by the temperature on sampling rows."""
    R = cand.shape[0]
    p = view.params
    scaled = torch.where(p.sample[:, None], processed / p.temperature[:, None], processed)
    lp = torch.where(p.lp_processed[:, None], scaled, view.logits).log_softmax(dim=-1)  # [R, V]
    win = cand.gather(1, sel[:, None])  # [R, 1]
    top_values, top_ids = lp.topk(LOGPROBS_WIDTH, dim=-1)  # [R, W]
    at = view.state.generated[:, None]  # [R, 1]
    view.lp_token.scatter_(1, at, lp.gather(1, win))
    wide = at[:, :, None].expand(R, 1, LOGPROBS_WIDTH)
    view.lp_top_ids.scatter_(1, wide, top_ids[:, None])
    view.lp_top_values.scatter_(1, wide, top_values[:, None])


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


def commit(model, view: PoolView, cand: torch.Tensor, sel: torch.Tensor, cand_hidden: torch.Tensor,
           extras: bool = False) -> None:
    """Make each slot's winner part of its sequence: token, cache position, context state, next logits (and with
    `extras`, the token counts the penalties read)."""
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
    if extras:
        view.counts.scatter_add_(1, win[:, None], running[:, None].float())
        view.seen.scatter_(1, win[:, None], running[:, None] | view.seen.gather(1, win[:, None]))
    view.logits.copy_(model.logits(win_hidden))  # [R, V]
    eos = (win[:, None] == p.eos).any(dim=1) & running  # [R]
    st.generated += running.long()
    st.next_pos += running.long()
    st.hit_eos |= eos
    st.finished |= eos | (st.generated >= p.max_new)


def decode_one_token(model, view: PoolView, K: int, sampling: bool, extras: bool = False) -> torch.Tensor:
    """One step for every slot of `view` (finished and free slots run too and stay unchanged), in place.

    K: candidates per slot (a bucket >= every slot's k); sampling: whether some
    slot samples (the [R, V] sort is skipped otherwise); extras: whether some slot asks for logits processing
    or logprobs (skipped otherwise). Returns the ranking's values [R, K] (what the
    winner is the argmax of; the compiled step discards them).
    """
    logits = processed_logits(view) if extras else view.logits  # [R, V]
    cand, cand_prob = propose(view, logits, K, sampling)  # [R, K]
    scratch = view.scratch + torch.arange(K, device=cand.device)  # [K]: candidate j at max_len + j
    positions = view.state.next_pos.clamp(max=model.n_positions - 1)  # [R]
    cand_hidden = model.candidates(cand, positions, scratch, view.valid, view.kv)  # [R, K, d]
    values = rank_values(view, cand, cand_prob, cand_hidden)  # [R, K]
    sel = values.argmax(dim=-1)  # [R]
    if extras:
        record_logprobs(view, logits, cand, sel)
    commit(model, view, cand, sel, cand_hidden, extras)
    return values
