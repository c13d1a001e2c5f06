"""Verifying proposed tokens against the target, batched over ``[B, K+1, V]``.

Terms, as in vLLM's rejection sampler: *accepted* tokens are draft tokens the target
keeps; the *recovered* token (source ``target``) replaces the first rejected one; the
*bonus* token follows a fully accepted draft. Three rules, chosen per row:

- greedy (temperature 0): accept while the draft token is the target's argmax; the
  recovered/bonus token is the argmax.
- unseeded sampling, standard rejection sampling (Leviathan et al. 2023, arXiv 2211.17192):
  accept x with probability min(1, p(x)/q(x)), tested as ``u*q(x) < p(x)`` (strict, so a
  token with p = 0 is never kept); at the first rejection draw from the normalised
  residual max(0, p - q); after K acceptances draw the bonus from p. Acceptance 1 - TV(p, q),
  the most any exact rule can reach.
- seeded sampling, drafter-invariant Gumbel coupling (Daliri, Musco, Suresh 2024,
  "Coupling without communication and drafter-invariant speculative decoding"): with
  E_t the Exp(1) noise keyed by (seed, position t), the draft proposes argmax(q_t / E_t),
  the target's token is argmax(p_t / E_t); accept while they agree, then emit the target's.
  Every output token is exactly the seeded plain sample of p, so a seeded request gives the
  same tokens whatever K, proposer, batch or load. The price: acceptance is
  P(argmaxes agree) >= (1 - TV)/(1 + TV), a little below rejection sampling's 1 - TV.

In both rules q is the distribution the draft drew from: a model's or head's distribution cut to its likeliest tokens
(engine.sampler.draft_draw), TV measured against that.

Deterministic proposals (n-gram) pass ``draft_probs=None``: q is one-hot on the token.

``verify`` picks each row's rule on the host and computes only what those rows need; ``verify_rows`` computes every
rule for every row and picks per row on the device, with no host data at all, so it can be captured in a CUDA graph
(engine.cuda_graphs ``run_verify``): the same tokens, in one replay instead of some forty launches.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from engine import rng
from engine.config import SamplingParams
from engine.devices import to_device
from engine.sampler import RowParams, cuts, draw, probs_batch


def accepted_prefix(ok: torch.Tensor) -> torch.Tensor:
    """``[B, K]`` per-position accept flags -> ``[B]`` length of the all-accepted prefix."""
    # index of the first rejection (argmax returns the first maximum); no cumprod, a DirectML CPU fallback
    stop = torch.cat([~ok, torch.ones(ok.shape[0], 1, dtype=torch.bool, device=ok.device)], 1)
    return stop.to(torch.uint8).argmax(1)


def next_token_dist(p_at: torch.Tensor, q_at: torch.Tensor | None, tok_at: torch.Tensor,
                    rejected: torch.Tensor) -> torch.Tensor:
    """What the token after the accepted prefix is drawn from (``[B, V]``, unnormalised is fine
    for the exponential race): the residual max(0, p - q) where a draft token was rejected,
    p itself (the bonus) where all were accepted."""
    if q_at is None:  # one-hot q: the residual is p without the rejected token
        residual = p_at.scatter(-1, tok_at[:, None], 0.0)
    else:
        residual = (p_at - q_at).clamp_min_(0.0)
    # the residual is all-zero only through rounding when p == q; then p is the right law
    use_residual = rejected & (residual.sum(-1) > 0)
    return torch.where(use_residual[:, None], residual, p_at)


NextDist = Callable[[torch.Tensor, "torch.Tensor | None", torch.Tensor, torch.Tensor], torch.Tensor]


def verify_sampled(draft_tokens: torch.Tensor, num_draft: torch.Tensor, draft_probs: torch.Tensor | None,
                   target_probs: torch.Tensor, sample_keys: torch.Tensor, accept_keys: torch.Tensor,
                   next_dist: NextDist | None = None, cut: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Standard rejection sampling for a batch; model-free.

    draft_tokens [B, K] (padding past ``num_draft`` [B] is ignored), draft_probs [B, K, V]
    or None (one-hot), target_probs [B, K+1, V]; sample_keys [B, K+1] and accept_keys [B, K]
    key the draws at each position (engine.rng.key). Returns (accepted [B], next token [B]).
    ``next_dist`` exists so tests can prove the distribution tests catch broken rules; ``cut``: the rows' top-p /
    top-k cut their distributions (``sampler.draw``).
    """
    b, k = draft_tokens.shape
    rows = torch.arange(b, device=draft_tokens.device)
    tok = draft_tokens.clamp_min(0)
    j = torch.arange(k, device=tok.device)
    p_x = target_probs[:, :k].gather(-1, tok[..., None]).squeeze(-1)  # [B, K]
    q_x = torch.ones_like(p_x) if draft_probs is None else draft_probs.gather(-1, tok[..., None]).squeeze(-1)
    u = rng.uniform(accept_keys)  # [B, K]
    ok = (u * q_x < p_x) & (j[None, :] < num_draft[:, None])  # strict: p(x) = 0 is never accepted
    accepted = accepted_prefix(ok)  # [B]
    at = accepted.clamp(max=max(k - 1, 0))
    tok_at = tok[rows, at] if k else torch.zeros_like(accepted)
    q_at = None if draft_probs is None or k == 0 else draft_probs[rows, at]
    dist = (next_dist or next_token_dist)(target_probs[rows, accepted], q_at, tok_at, accepted < num_draft)
    nxt = draw(dist, sample_keys[rows, accepted], cut)
    return accepted, nxt


def verify(target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_draft: torch.Tensor,
           draft_probs: torch.Tensor | None, rp: RowParams, sample_keys: torch.Tensor,
           accept_keys: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Verify a whole step's rows (plain rows are rows with ``num_draft`` 0).

    target_logits [B, K+1, V]; draft_tokens [B, K]; num_draft [B]; draft_probs [B, K, V] or
    None (all proposals one-hot; only unseeded sampled rows read q); rp: per-row params (a
    row's seed decides its rule: seeded sampled rows use the Gumbel coupling);
    sample_keys [B, K+1], accept_keys [B, K] (None when no unseeded sampled row drafted).
    Returns (accepted [B], tokens [B, K+1]: the accepted draft tokens then the recovered or
    bonus token).
    """
    b, k1, _ = target_logits.shape
    k = k1 - 1
    dev = target_logits.device
    sampled = rp.rows(lambda p: not p.greedy)
    greedy = len(sampled) < b
    if len(sampled) == b:
        choice = torch.empty(b, k1, dtype=torch.long, device=dev)
    else:
        choice = target_logits.argmax(-1)  # [B, K+1]: greedy rows' tokens
    if sampled:
        s_idx = to_device(sampled, torch.long, dev) if greedy else slice(None)
        sub = rp.select(sampled) if greedy else rp
        cut = sub.truncates(target_logits.shape[-1])
        p = probs_batch(target_logits[s_idx], sub, cut)  # [S, K+1, V]
        if k == 0:  # a plain step: one draw per row, no acceptance to decide
            choice[s_idx] = draw(p, sample_keys[s_idx], cut)
            return torch.zeros(b, dtype=torch.long, device=dev), choice
        # seeded rows: the target's own Gumbel-max sample at every position (the coupling)
        seeded = [n for n, i in enumerate(sampled) if rp.host[i].seed is not None]
        if seeded:
            if len(seeded) == b:  # every row seeded: no index tensors
                choice = draw(p, sample_keys, cut)
            else:
                rows_t = to_device([sampled[n] for n in seeded], torch.long, dev)
                choice[rows_t] = draw(p[to_device(seeded, torch.long, dev)], sample_keys[rows_t], cut)
    if k == 0:
        return torch.zeros(b, dtype=torch.long, device=dev), choice
    j = torch.arange(k1, device=dev)
    ok = (draft_tokens == choice[:, :k]) & (j[None, :k] < num_draft[:, None])
    accepted = accepted_prefix(ok)
    nxt = choice.gather(1, accepted[:, None]).squeeze(1)
    by_rule = [n for n, i in enumerate(sampled) if rp.host[i].seed is None]  # unseeded: rejection sampling
    if by_rule:
        rows = [sampled[n] for n in by_rule]
        r_idx = to_device(rows, torch.long, dev)
        q = None if draft_probs is None else draft_probs[r_idx]
        a, t = verify_sampled(draft_tokens[r_idx], num_draft[r_idx], q, p[to_device(by_rule, torch.long, dev)],
                              sample_keys[r_idx], accept_keys[r_idx], cut=cut)
        accepted[r_idx] = a
        nxt[r_idx] = t
    tokens = torch.cat([draft_tokens.clamp_min(0), torch.zeros_like(nxt)[:, None]], 1)
    tokens.scatter_(1, accepted[:, None], nxt[:, None])
    return accepted, tokens


def row_settings(params: list[SamplingParams], vocab: int) -> tuple[list[list[float]], bool]:
    """``verify_rows``' per-row ``settings`` (temperature, top_p, top_k, seeded) as host lists, and its ``truncate``:
    whether some sampled row cuts (as ``verify`` decides it over its sampled rows)."""
    settings = [[p.temperature, p.top_p, float(p.top_k), float(p.seed is not None)] for p in params]
    return settings, cuts(params, vocab)


def verify_rows(target_logits: torch.Tensor, draft_tokens: torch.Tensor, num_draft: torch.Tensor,
                draft_probs: torch.Tensor | None, settings: torch.Tensor, sample_keys: torch.Tensor,
                accept_keys: torch.Tensor, truncate: bool) -> torch.Tensor:
    """``verify`` with every row's rule chosen on the device, from ``settings`` ``[B, 4]`` float32 (temperature,
    top_p, top_k, seeded: 1 where the request has a seed); no host sync and no shape that depends on the rows' rules.
    ``truncate``: whether the sort of top-p / top-k runs (``row_settings`` gives both as ``verify`` decides them).
    ``accept_keys`` ``[B, K]`` is read only by unseeded sampled rows (any values elsewhere). Returns ``[B, K+2]``:
    each row's accepted count, then its tokens as ``verify`` returns them."""
    b, k1, _ = target_logits.shape
    k = k1 - 1
    temperature, top_p, top_k, seeded = settings.unbind(1)
    greedy = temperature <= 0
    rp = RowParams(torch.where(greedy, torch.ones_like(temperature), temperature), top_p, top_k.long(), [])
    p = probs_batch(target_logits, rp, truncate)  # [B, K+1, V]: greedy rows' is never read
    choice = torch.where(greedy[:, None], target_logits.argmax(-1), draw(p, sample_keys))  # [B, K+1]
    j = torch.arange(k, device=target_logits.device)
    ok = (draft_tokens == choice[:, :k]) & (j[None, :] < num_draft[:, None])
    accepted = accepted_prefix(ok)
    nxt = choice.gather(1, accepted[:, None]).squeeze(1)
    if k:  # unseeded sampled rows: rejection sampling
        a, t = verify_sampled(draft_tokens, num_draft, draft_probs, p, sample_keys, accept_keys)
        by_rule = ~greedy & (seeded == 0)
        accepted, nxt = torch.where(by_rule, a, accepted), torch.where(by_rule, t, nxt)
    tokens = torch.cat([draft_tokens.clamp_min(0), torch.zeros_like(nxt)[:, None]], 1)
    tokens.scatter_(1, accepted[:, None], nxt[:, None])
    return torch.cat([accepted[:, None], tokens], 1)
