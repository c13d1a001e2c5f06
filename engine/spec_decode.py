"""One decode step for every running row: propose (per row's method), verify on the target in one
batched forward, and return what each row keeps. Plain rows are rows that propose nothing."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine import rng
from engine.devices import to_device
from engine.model_runner import ModelRunner, RowInput
from engine.proposers.base import Proposal, Proposer, StepRows
from engine.rejection import row_settings, verify
from engine.sampler import RowParams
from engine.sequence import Request
from engine.threads import StepThreads


@dataclass
class RowResult:
    req: Request
    method: str  # the proposer that drafted ("" for a plain row)
    k: int  # tokens proposed (may be fewer than planned)
    accepted: int
    tokens: list[int]  # accepted draft tokens, then the recovered or bonus token
    logits: torch.Tensor  # [k + 1, V] target logits (for logprobs)


@dataclass
class StepTiming:
    propose_s: float
    target_s: float  # on a GPU: the forward and the verification (launches overlap it), up to the tokens on the host
    total_s: float
    explored: bool = False  # a phase ran at a thread count being measured, not the preferred one (engine.threads)
    split: bool = True  # propose_s and target_s time their phases; False where the draft stayed on the device (its
    # work then ran within target_s, up to the verification's host copy, and propose_s is its launch only)


def sampling_key_rows(reqs: list[Request], k: int) -> tuple[list[list[int]], list[list[int]] | None]:
    """Keys of the target's draws at each row's next K+1 positions, and of the acceptance tests
    at the next K (None when no unseeded sampled row needs them), as host lists."""
    positions = [[r.num_tokens + j for j in range(k + 1)] for r in reqs]
    seeds = [r.seed for r in reqs]
    sample = rng.key_rows(seeds, positions, rng.SAMPLE)
    need_accept = k > 0 and any(not r.params.greedy and r.params.seed is None for r in reqs)
    accept = rng.key_rows(seeds, [p[:k] for p in positions], rng.ACCEPT) if need_accept else None
    return sample, accept


def sampling_keys(reqs: list[Request], k: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``sampling_key_rows`` as tensors on ``device``."""
    sample, accept = sampling_key_rows(reqs, k)
    return to_device(sample, torch.int64, device), None if accept is None else to_device(accept, torch.int64, device)


def _stack_padded(rows: list[torch.Tensor]) -> torch.Tensor:
    """list of [n_i, V] -> [B, max n, V], zero-padded at the end (padding is never read)."""
    n = max(r.shape[0] for r in rows)
    if len(rows) == 1:
        return rows[0][None]
    if all(r.shape[0] == n for r in rows):
        return torch.stack(rows)
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True)


def decode_step(target: ModelRunner, proposers: dict[str, Proposer], plan: dict[Request, tuple[int, str]],
                fallback: dict[Request, tuple[int, str]] | None = None, threads: StepThreads | None = None,
                while_device: Callable[[], None] | None = None) -> tuple[list[RowResult], StepTiming]:
    """plan: request -> (K, method); fallback: (K, method) for n-gram rows where the lookup finds no match
    (the draft model or the EAGLE head, which draft after n-gram in the same step). ``threads``: chooses the CPU
    thread count of the drafting and of the verification, and learns from their times. ``while_device``: host work
    to run while the target's verification forward computes (an asynchronous device: its launches are queued).
    Changes state: the target's and proposers' caches grow by what they read (the caller rolls them
    back to the verified tokens)."""
    t0 = time.perf_counter()
    reqs = list(plan)
    dev = target.device
    greedy = all(r.params.greedy for r in reqs)
    # all-greedy steps need no sampling tensors at all: the plain path stays as lean as before
    rp = None if greedy else RowParams.build([r.params for r in reqs], dev)
    lists: list[list[int]] = [[] for _ in reqs]
    on_device = None  # [D, K] on the device: one proposer's drafts of rows ``drafters`` (Proposal.drafted)
    drafters: list[int] = []
    q_parts: list[tuple[list[int], Proposal]] = []
    used = [plan[r][1] for r in reqs]
    ks = [plan[r][0] for r in reqs]
    explored = False
    modelled = [i for i in range(len(reqs)) if ks[i] > 0 and used[i] != "ngram"]  # rows a model drafts for
    drafter = ""  # the proposer(s) whose forwards the draft phase runs (the CPU's thread count is chosen per proposer)
    if threads is not None:
        if threads.enabled:
            drafter = "+".join(sorted({used[i] for i in modelled}))
        n_draft = threads.choose(len(modelled), len(modelled), "draft", drafter)
        explored = threads.exploring
    # n-gram first: where it finds no match, an auto row may draft with the model or the head in the same step
    for name in sorted(proposers, key=lambda n: n != "ngram"):
        idx = [i for i in range(len(reqs)) if ks[i] > 0 and used[i] == name]
        if not idx:
            continue
        sub = None if greedy else rp.select(idx)
        prop = proposers[name].propose(StepRows([reqs[i] for i in idx], _one_k(proposers[name], reqs, idx, ks), sub))
        if prop.token_lists is None and on_device is None:
            # the verification reads them on the device; the host gets them in its one copy. On an H200 (demo pair,
            # fp16, 8 rows, K = 6) copying them first cost the step ~0.85 ms waiting for the draft, and the host
            # work that builds the verification's inputs then ran with the device idle
            on_device, drafters = prop.drafted, idx
            for i in idx:
                lists[i] = [0] * min(ks[i], on_device.shape[1])  # placeholders of the row's own K
        else:
            for i, toks in zip(idx, prop.lists()):
                lists[i] = toks[: ks[i]]
        q_parts.append((idx, prop))
        if name == "ngram" and fallback:
            _fall_back(reqs, idx, lists, used, ks, fallback, proposers)
    t1 = time.perf_counter()
    tokens = sum(len(t) + 1 for t in lists)
    if threads is not None:
        drafted = [i for i in range(len(reqs)) if lists[i] and used[i] != "ngram"]
        # per drafted token, in the bucket chosen for (rows that fell back from n-gram drafted too); not when a
        # proposer first caught up on a prompt or on tokens it skipped (a first EAGLE step reads the prompt's pairs)
        if drafted and not any(p.backlog for p in proposers.values()):
            threads.observe(n_draft, len(modelled), t1 - t0, len(modelled), "draft",
                            per_tokens=sum(len(lists[i]) for i in drafted), kind=drafter)
        n_verify = threads.choose(tokens, len(reqs), "verify")
        explored = explored or threads.exploring
    # rows that may draft with the EAGLE head bring back the target's features of what it verified, while the head is
    # in play for them (``StepPlanner.features``)
    held = set(drafters)
    rows_in = [RowInput(r.seq_id, r.all_ids[target.cached_len(r.seq_id):] + lists[i], len(lists[i]) + 1,
                        r.use_eagle and r.features,
                        len(lists[i]) if i in held else 0) for i, r in enumerate(reqs)]
    # on a GPU the verification's launches overlap the forward (not synced): the target's time then runs to the
    # verified tokens' copy to the host, which waits for both
    synced = dev.type == "cpu"
    per_row = target.forward(rows_in, sync=synced, tail=on_device)
    if while_device is not None:
        while_device()
    t2 = time.perf_counter()
    if threads is not None:
        threads.observe(n_verify, tokens, t2 - t1, len(reqs), "verify")
    if greedy:
        verified = _verify_greedy_host(per_row, lists, on_device, drafters)
    else:
        logits = _stack_padded(per_row)  # [B, K+1, V]
        kmax = logits.shape[1] - 1
        q = _gather_q(q_parts, lists, len(reqs), kmax, logits.shape[-1], dev)
        sample_rows, accept_rows = sampling_key_rows(reqs, kmax)
        host = None
        if target.graphs is not None:  # CUDA: the whole verification as one graph replay
            settings, truncate = row_settings([r.params for r in reqs], logits.shape[-1])
            host = target.graphs.run_verify(logits, lists, settings, sample_rows, accept_rows, q, truncate,
                                            on_device, drafters)
        if host is None:
            if on_device is not None:
                _take_drafts(lists, drafters, on_device.tolist())
            # [B, K] draft tokens (-1 past a row's K) and [B] their counts, in one copy
            packed = to_device([toks + [-1] * (kmax - len(toks)) + [len(toks)] for toks in lists], torch.long, dev)
            sample_keys = to_device(sample_rows, torch.int64, dev)
            accept_keys = None if accept_rows is None else to_device(accept_rows, torch.int64, dev)
            accepted, tokens = verify(logits, packed[:, :kmax], packed[:, kmax], q, rp, sample_keys, accept_keys)
            host = torch.cat([accepted[:, None], tokens], 1).tolist()  # the step's one host copy
        verified = [(h[0], h[1: h[0] + 2]) for h in host]
    if not synced:
        t2 = time.perf_counter()
    out = []
    for i, r in enumerate(reqs):
        a, tokens = verified[i]
        k = len(lists[i])
        out.append(RowResult(r, used[i] if k else "", k, a, tokens, per_row[i]))
    t3 = time.perf_counter()
    return out, StepTiming(t1 - t0, t2 - t1, t3 - t0, explored, split=on_device is None)


def _one_k(proposer: Proposer, reqs: list[Request], idx: list[int], ks: list[int]) -> list[int]:
    """The K each of ``idx``'s rows drafts to: where the proposer drafts steps 2..K as one CUDA graph (``chains``) and
    the rows planned different K, every row drafts the largest (the caller keeps each row's own K of it) when the
    proposer's cache has room for that: step by step, on an H200 at batch 8, a step with one row at K = 3 beside seven
    at K = 4 (a request near its last token) took 8.5 ms against 6.3 ms for all eight at K = 4. A row cut by the
    context drafts at most MAX_DRAFT_TOKENS - 1 positions past it: inside the block of slack that the caches' block
    tables and position tables keep past the context."""
    own = [ks[i] for i in idx]
    top = max(own)
    if len(set(own)) == 1 or not getattr(proposer, "chains", False) or not proposer.fits({reqs[i]: top for i in idx}):
        return own
    return [top] * len(idx)


def _fall_back(reqs: list[Request], idx: list[int], lists: list[list[int]], used: list[str], ks: list[int],
               fallback: dict[Request, tuple[int, str]], proposers: dict[str, Proposer]) -> None:
    """Rows n-gram had nothing for draft with their fallback method instead, when their plan allows and that
    proposer's cache has room for them as well as for its own rows."""
    for method in ("model", "eagle"):
        rows = [i for i in idx if not lists[i] and fallback.get(reqs[i], (0, ""))[1] == method
                and fallback[reqs[i]][0] > 0]
        if not rows or method not in proposers:
            continue
        wanted = {reqs[i]: ks[i] for i in range(len(reqs)) if used[i] == method and ks[i] > 0}
        wanted.update({reqs[i]: fallback[reqs[i]][0] for i in rows})
        if proposers[method].fits(wanted):
            for i in rows:  # never more than the target made room for
                used[i], ks[i] = method, min(ks[i], fallback[reqs[i]][0])


def _take_drafts(lists: list[list[int]], drafters: list[int], rows: list[list[int]]) -> None:
    """The drafts of rows ``drafters`` (``rows``, copied from the device) in place of their placeholders in
    ``lists``: each row's own K of them."""
    for i, toks in zip(drafters, rows):
        lists[i] = toks[: len(lists[i])]


def _verify_greedy_host(per_row: list[torch.Tensor], lists: list[list[int]], drafted: torch.Tensor | None = None,
                        drafters: list[int] = ()) -> list[tuple[int, list[int]]]:
    """Greedy rows: one argmax over the step and one host copy; accept while the draft is the argmax. ``drafted``:
    rows ``drafters``' drafts on the device (``lists`` holds placeholders), brought to ``lists`` in the same copy."""
    n = max(x.shape[0] for x in per_row)
    lens = [x.shape[0] for x in per_row]
    argmax = (torch.stack(per_row) if all(m == n for m in lens) else torch.cat(per_row)).argmax(-1).reshape(-1)
    if drafted is None:
        flat = argmax.tolist()
    else:
        k = drafted.shape[1]
        flat = torch.cat([drafted.reshape(-1), argmax]).tolist()
        _take_drafts(lists, drafters, [flat[j * k: (j + 1) * k] for j in range(len(drafters))])
        flat = flat[len(drafters) * k:]
    choices, start = [], 0
    for m in lens:
        choices.append(flat[start: start + m])
        start += m
    out = []
    for toks, choice in zip(lists, choices):
        a = 0
        while a < len(toks) and toks[a] == choice[a]:
            a += 1
        out.append((a, toks[:a] + [choice[a]]))
    return out


def _gather_q(parts: list[tuple[list[int], Proposal]], lists: list[list[int]], b: int, kmax: int, vocab: int,
              device) -> torch.Tensor | None:
    """One q [B, K, V] when some proposer sampled from a distribution; deterministic rows get one-hot."""
    if kmax == 0 or all(p.probs is None for _, p in parts):
        return None
    q = torch.zeros(b, kmax, vocab, device=device)
    for idx, prop in parts:
        sel = to_device(idx, torch.long, device)
        if prop.probs is not None:
            q[sel, : prop.probs.shape[1]] = prop.probs[:, :kmax]
        else:
            draft = to_device([lists[i] + [-1] * (kmax - len(lists[i])) for i in idx], torch.long, device)
            q[sel] = torch.nn.functional.one_hot(draft.clamp_min(0), vocab).float() * (draft >= 0)[..., None]
    return q


def first_token(req: Request, logits: torch.Tensor) -> int:
    """The token after the prompt (``logits`` [n, V], last row used), drawn exactly as a plain decode step draws it."""
    if req.params.greedy:
        return int(logits[-1].argmax())
    rp = RowParams.build([req.params], logits.device)
    sample_keys, _ = sampling_keys([req], 0, logits.device)
    no_draft = torch.zeros(1, 0, dtype=torch.long, device=logits.device)
    _, tokens = verify(logits[None, -1:], no_draft, torch.zeros(1, dtype=torch.long, device=logits.device), None, rp,
                       sample_keys, None)
    return int(tokens[0, 0])
