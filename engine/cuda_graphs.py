"""CUDA graphs for the lean forward's small steps: decode, draft and verification.

A step of a few rows and a few tokens is bound by kernel launches, not by the GPU (a 1B
model runs ~300 kernels in well under a millisecond of GPU time). Each graph is captured
once per (rows bucket, tokens-per-row bucket, key-length bucket) over static input buffers and
replayed with new contents, as nano-vllm's ``capture_cudagraph`` does for decode. Rows are
padded up to the bucket: padding rows write their K/V to the pool's scratch block and read
one harmless key. The engine's warm-up captures the
shapes of up to 8 rows at short contexts (``prewarm``); others are captured lazily, into one shared memory
pool, the second time a shape is used (``CAPTURE_AFTER``): a capture costs tens of milliseconds (two warm-up forwards and
the capture itself), an eager step a few, and adaptive K meets shapes it uses once (an explored
K, a batch that shrank to an odd size for one step). Prompt chunks (a prefill, a draft reading a prompt) of up to
PREFILL_GRAPH_TOKENS padded tokens at short contexts replay graphs of their own, which keep each row's last logits
only; longer ones and anything beyond the buckets run eagerly.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from dataclasses import dataclass

import torch

from engine.attention import CUDNN_MIN_KEYS, AttnBatch, causal_mask, cudnn_attention, key_slots
from engine.config import MAX_DRAFT_TOKENS
from engine.devices import to_device

logger = logging.getLogger(__name__)

ROW_BUCKETS = (1, 2, 4, 8, 16, 32)
# tokens per row, left-padded up to the bucket (as the runner pads ragged rows): adaptive K verifies K + 1 tokens and
# a draft's first step reads accepted + 1, so every K it tries met new shapes, and on an H200 at batch 8 the captures
# in a timed pass cost adaptive a third of fixed K's speed. A padded token writes the scratch slot and costs a
# launch-bound step almost nothing.
TOKEN_BUCKETS = (1, 2, 3, 5, 9)
MAX_TOKENS_PER_ROW = TOKEN_BUCKETS[-1]  # verification of K = 8 draft tokens
# prompt chunks (a prefill step, a draft model reading a prompt): rows of more tokens, left-padded up to a bucket at most
# 1.5x their length, up to PREFILL_GRAPH_TOKENS padded tokens a step and PREFILL_MAX_KEYS keys; these graphs return each
# row's last logits only. Speculating rows finish steps apart, so each next request's prompt is read in a step of its
# own: on an H200 (demo pair, fp16, 8 clients) such eager prefills took 0.11-0.14 s of each ~1 s pass against plain's
# 0.05 s, where plain rows finish together and share one.
PREFILL_TOKEN_BUCKETS = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
PREFILL_GRAPH_TOKENS = 512
PREFILL_MAX_KEYS = 1024
PREWARM_PREFILL_TOKENS = 128  # warm-up captures prompt chunks of rows up to this bucket (``prewarm_prefill``): rows
# buckets up to 8, as many rows as PREFILL_GRAPH_TOKENS holds. One row's alone, the prompts of requests admitted together
# (clients whose requests finished in one step) met new shapes in timed passes: on an H200 at 8 clients (demo pair, fp16)
# 4-7 one-offs of 10-18 ms a pass of ~0.6 s, the target's with and without EAGLE features apart
MAX_CHAIN_STEPS = MAX_DRAFT_TOKENS - 1  # drafting steps 2..K (``replay_chain``)
MAX_SAMPLED_CHAIN_ROWS = 8  # sampled chains share a q buffer per rows bucket: rows x 8 x vocab floats
MIN_KEY_BUCKET = 256
CAPTURE_AFTER = 1  # eager uses of a shape before its graph is captured (HELIX_GRAPH_CAPTURE_AFTER)
# drafting chains captured at warm-up: greedy, and sampled without top-p / top-k cuts (requests' default sampling).
# Captured lazily, an adaptive batch met them as it tried K: on an H200 at 8 clients (demo pair, T = 0.8) steps of
# 16-23 ms against ~4.5 ms, and a pass of ~0.8 s with a few of them ran at half the speed of the next
PREWARM_CHAIN_MODES = ("greedy", "sample")
# A graph holds its own outputs (a decode graph's logits: ~0.4 MB a token at a 200k vocabulary), so graphs are captured
# only while the device keeps this share of its memory free (and at least GRAPH_FREE_MIN bytes) for eager steps, a
# prompt chunk, a batch's logits, a shape no graph covers, after the capture too: its size is predicted from the largest
# growth per token a capture of the runner has shown. On an H100 (80 GB) the phi-4-mini shape's captures, recorded for
# a backward before ``capture`` turned autograd off, held 12-22 MB per padded token and 68 GB in all; the next capture
# failed out of memory, and every request then failed too. Without autograd the same 46 graphs take 190 MB.
GRAPH_FREE_FRACTION = 0.10
GRAPH_FREE_MIN = 2 << 30


def memory_for_graphs(device: torch.device | None, need: float = 0.0) -> bool:
    """Whether ``device`` has room for a graph that takes ``need`` bytes and still leaves GRAPH_FREE_FRACTION /
    GRAPH_FREE_MIN of it free (counting what torch's allocator holds unused); always on other devices (the tests'
    stand-ins)."""
    if device is None or device.type != "cuda":
        return True
    free, total = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return free >= max(GRAPH_FREE_MIN, GRAPH_FREE_FRACTION * total) + need


def graph_need(owner, key: tuple) -> float:
    """The bytes a capture of ``key`` is predicted to take: its rows x tokens (or steps), ``key[0] * key[1]`` in
    every store's keys, at the largest growth per token ``owner``'s captures showed (``measured``; 0 before any)."""
    per_token = getattr(owner, "bytes_per_token", 0.0)
    return per_token * key[0] * key[1] if per_token else 0.0


def measured(owner, key: tuple, capture):
    """``capture()``, with the device memory it took per token of ``key`` kept as ``owner.bytes_per_token`` where
    it is the largest so far (``graph_need``). Not ``owner``'s first capture: that one also allocates what every later
    one shares (the side stream's cuBLAS workspace, the inputs' staging; 33 MB at 1 row x 1 token on an H100, where a
    graph's own outputs took ~0.4 MB a token), so it would predict every graph ~80x too large."""
    device = getattr(owner, "device", None)
    if device is None or device.type != "cuda":
        return capture()
    if not getattr(owner, "captured_once", False):
        out = capture()
        owner.captured_once = True
        return out
    before = torch.cuda.memory_allocated(device)
    out = capture()
    grew = (torch.cuda.memory_allocated(device) - before) / max(1, key[0] * key[1])
    owner.bytes_per_token = max(getattr(owner, "bytes_per_token", 0.0), grew)
    return out


def release_graphs(owner, why: str) -> None:
    """``owner``'s graphs, after a capture failed (``why``: it runs eagerly from now on): every one dropped, so their
    memory serves the eager steps (captured graphs no longer replay; kept, a capture that ran out of memory left the
    steps none)."""
    owner.failed = why
    device = getattr(owner, "device", None)
    cuda = device is not None and device.type == "cuda"
    if cuda:
        with contextlib.suppress(Exception):  # a capture's own error may surface here again
            torch.cuda.synchronize(device)  # no replay still reading what is dropped
    for name in ("graphs", "chains", "verifies", "_chain_io", "_verify_io"):
        store = getattr(owner, name, None)
        if isinstance(store, dict):
            store.clear()
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()


IO_EXTRA = 4096  # the forward graphs' staging past the largest graph's inputs: a forward's rows, the block tables'
# changes and a draft's tail indices (``GraphRunner.load``; more than fits takes a second copy)


def key_buckets(max_keys: int) -> tuple[int, ...]:
    """Key-length buckets: steps of 256 up to 4096, of 1024 up to 16384, then doubling; ``max_keys`` last.

    Every key past a row's length is still read and masked, so coarse buckets cost attention time at
    long contexts (a 1664-token context in a 2048 bucket reads 23% more keys); a finer bucket costs
    one more lazily captured graph per 256 tokens of context."""
    out, size = [], MIN_KEY_BUCKET
    while size < max_keys:
        out.append(size)
        size += 256 if size < 4096 else 1024 if size < 16384 else size
    return tuple(out) + (max_keys,)


@contextlib.contextmanager
def _no_gc():
    """No garbage collection while a graph is captured (``torch.cuda.graph`` collects before it starts): a cycle
    collected mid-capture that holds another engine's graphs (a model switched in the app, an earlier test) frees
    their memory during the capture, which invalidates it, and the runner then stays eager for good."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def capture(fn, device, stream, mempool, keys: int):
    """``fn()`` captured into a CUDA graph over ``mempool`` (after two warm-up calls on the side ``stream``, which
    load kernels and settle allocations off the capture, and build cuDNN's attention plan where the key bucket
    ``keys`` may use it: ``attention.CUDNN_MIN_KEYS``); returns (graph, what ``fn`` returned: the static outputs).
    Without autograd: a model's weights are parameters that require grad, and a forward recorded for a backward keeps
    every intermediate it saves alive as long as its output lives, which for a graph's static output is for good
    (measured on an H100, the phi-4-mini shape's warm-up captures, which ran outside the runner's inference mode:
    12-22 MB per padded token, 58 GB for its prompt chunks' graphs). Without it, a capture's intermediates go back to
    the shared pool when it ends and the next capture reuses them."""
    with torch.no_grad(), cudnn_attention(keys >= CUDNN_MIN_KEYS):
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            for _ in range(2):
                fn()
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with _no_gc(), torch.cuda.graph(graph, pool=mempool, stream=stream):
            out = fn()
    GraphRunner.captures += 1
    GraphRunner.one_offs += 1
    return graph, out


def chain_shapes(max_rows: int, modes: tuple[str, ...]):
    """(rows bucket, steps, mode) of every drafting chain a warm-up captures: rows buckets up to ``max_rows`` (sampled
    chains up to MAX_SAMPLED_CHAIN_ROWS), steps 1..MAX_CHAIN_STEPS, each of ``modes``."""
    for mode in modes:
        for r in ROW_BUCKETS:
            if r <= max_rows and (mode == "greedy" or r <= MAX_SAMPLED_CHAIN_ROWS):
                for steps in range(1, MAX_CHAIN_STEPS + 1):
                    yield r, steps, mode


def prefill_shapes(max_rows: int, max_tokens: int = PREWARM_PREFILL_TOKENS):
    """(rows bucket, tokens bucket) of every prompt chunk a warm-up captures: rows buckets up to ``max_rows``, tokens
    buckets up to ``max_tokens`` whose rows x tokens fit PREFILL_GRAPH_TOKENS."""
    for r in ROW_BUCKETS:
        if r <= max_rows:
            for m in PREFILL_TOKEN_BUCKETS:
                if m <= max_tokens and r * m <= PREFILL_GRAPH_TOKENS:
                    yield r, m


def capture_missing(owner, store: dict, captures) -> int:
    """Warm-up's captures (forward graphs, drafting chains): ``store[key] = capture()`` for each ``(key, capture)`` of
    ``captures`` whose key ``store`` lacks, while the device has room for them (``memory_for_graphs``: the rest are
    captured as steps meet them, where there is room then); returns how many were captured. The first that fails is
    recorded in ``owner.failed`` (its steps run eagerly, its chains step by step, from then on; ``release_graphs``)
    and stops it."""
    done = 0
    for key, fn in captures:
        if key not in store:
            if not memory_for_graphs(getattr(owner, "device", None), graph_need(owner, key)):
                logger.info("CUDA graphs: warm-up stopped after %d captures, to keep device memory for eager steps", done)
                return done
            try:
                store[key] = measured(owner, key, fn)
            except Exception as exc:  # noqa: BLE001 - recorded in owner.failed
                release_graphs(owner, f"{type(exc).__name__}: {exc}")
                logger.warning("CUDA graph capture failed at warm-up, running eagerly: %s", owner.failed)
                return done
            done += 1
    return done


def bucket(value: int, buckets) -> int | None:
    for b in buckets:
        if value <= b:
            return b
    return None


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    input_ids: torch.Tensor  # [R, N]
    positions: torch.Tensor  # [R, N]
    slots: torch.Tensor  # [R * N]
    table: torch.Tensor  # [R, ceil(T / block size)]: the rows' block tables (their key slots and mask are the graph's)
    logits: torch.Tensor  # [R, N, V]
    hidden: torch.Tensor | None = None  # [R, N, len(aux_layers) * H]: an EAGLE-3 head's features, when asked


@dataclass
class _Chain:
    """A drafting chain of S forwards and S + 1 draws in one graph (``GraphRunner.replay_chain``), greedy or sampled."""

    graph: torch.cuda.CUDAGraph
    first: torch.Tensor  # [R, V] float32: each row's logits of its first draw
    start: torch.Tensor  # [R] its position
    slots: torch.Tensor  # [S, R] where step s writes each row's K/V
    table: torch.Tensor  # [R, ceil(T / block size)]: the rows' block tables (their key slots are the graph's)
    out: torch.Tensor  # [R, S + 1] each draw's token
    sampling: ChainSampling | None = None  # sampled chains: the rows' settings, keys and draft distributions


@dataclass
class _Verify:
    """A sampled step's verification in one graph (``GraphRunner.run_verify``): static inputs (logits, settings and q
    views of buffers shared by the rows bucket's verification graphs, ints its own), and ``out`` ``[R, N + 1]``: each
    row's accepted count, then its tokens."""

    graph: torch.cuda.CUDAGraph
    logits: torch.Tensor  # [R, N, V] the target's logits
    ints: torch.Tensor  # [R, 3N - 1]: draft tokens (N - 1, -1 past a row's K), their count, sample keys (N), accept (N - 1)
    settings: torch.Tensor  # [R, 4] float32: temperature, top_p, top_k, seeded
    q: torch.Tensor | None  # [R, N - 1, V] the draft distributions (None: one-hot proposals)
    out: torch.Tensor


@dataclass
class ChainSampling:
    """What a sampled drafting chain reads and writes besides tokens (``GraphRunner.replay_chain``): per row its
    temperature (0: greedy, an argmax), top-p and top-k, the keys of each of its draws ``[R, D]`` (engine.rng.key;
    any for greedy rows: the graph makes the race's Exp(1) noise from them, as engine.sampler.draw does), and,
    written, each draw's draft distribution q ``[R, D, V]`` (zeros for greedy rows)."""

    temperature: torch.Tensor
    top_p: torch.Tensor
    top_k: torch.Tensor
    keys: torch.Tensor
    probs: torch.Tensor | None = None
    truncate: bool = False  # some row's top-p / top-k cuts (the sort runs only then)

    @classmethod
    def of_rows(cls, rp, keys: list[list[int]], vocab: int) -> ChainSampling | None:
        """The sampling of a chain over rows with settings ``rp`` (an engine.sampler.RowParams) whose draws are keyed
        by ``keys`` (a host list per row). None where sampled chains do not run: more than MAX_SAMPLED_CHAIN_ROWS
        rows."""
        if len(keys) > MAX_SAMPLED_CHAIN_ROWS:
            return None
        return cls(rp.temperature, rp.top_p, rp.top_k, to_device(keys, torch.int64, rp.temperature.device),
                   truncate=rp.truncates(vocab))

    @staticmethod
    def mode(sampling: ChainSampling | None) -> str:
        """The kind of graph a chain with ``sampling`` replays: greedy, sample, or sample-cut (the sort runs)."""
        return "greedy" if sampling is None else "sample-cut" if sampling.truncate else "sample"

    @classmethod
    def buffers(cls, io: dict, r: int, draws: int, vocab: int, device, truncate: bool) -> ChainSampling:
        """A captured chain's static inputs for ``r`` rows and ``draws`` draws; its q is a view of a buffer shared by
        every chain of the rows bucket in ``io`` (replays never overlap)."""
        shared = io.get(r)
        if shared is None:
            shared = io[r] = torch.zeros(r, MAX_DRAFT_TOKENS, vocab, device=device)
        return cls(torch.zeros(r, device=device), torch.ones(r, device=device),
                   torch.zeros(r, dtype=torch.long, device=device), torch.zeros(r, draws, dtype=torch.long,
                                                                                 device=device),
                   shared[:, :draws], truncate)

    def load(self, rows: ChainSampling) -> None:
        """Copy the settings and keys of ``rows`` (the first rows of the bucket) in before a replay."""
        c = rows.temperature.shape[0]
        self.temperature[:c].copy_(rows.temperature)
        self.temperature[c:].zero_()  # padding rows: an argmax
        self.top_p[:c].copy_(rows.top_p)
        self.top_k[:c].copy_(rows.top_k)
        self.keys[:c].copy_(rows.keys)

    def draw(self, s: int, logits: torch.Tensor, argmax: torch.Tensor, ids: torch.Tensor | None = None
             ) -> torch.Tensor:
        """Inside a captured chain: draw ``s``'s token of each row, ``argmax`` for greedy rows (temperature 0), a
        draft's draw of engine.sampler (``draft_draw``) from the row's distribution of ``logits`` ``[R, V']`` for the
        others (``ids``: the target id of each of the ``V'`` entries; None: the target's vocabulary); writes the
        draw's q over the target vocabulary (zeros for greedy rows)."""
        from engine.sampler import RowParams, draft_draw

        greedy = self.temperature <= 0
        rp = RowParams(torch.where(greedy, torch.ones_like(self.temperature), self.temperature), self.top_p,
                       self.top_k, [])
        drawn, probs = draft_draw(logits, rp, self.keys[:, s], self.truncate, ids, self.probs.shape[-1])
        self.probs[:, s].copy_(probs.masked_fill(greedy[:, None], 0.0))
        return torch.where(greedy, argmax, drawn)


class GraphRunner:
    """Replays captured graphs of ``lean.forward`` for small batches on one CUDA device."""

    captures = 0  # graphs captured by every runner of the process: a step that captured is no timing of a step
    one_offs = 0  # captures plus eager runs of shapes not captured yet: neither times a step as it will run

    def __init__(self, lean, pool, max_keys: int):
        self.lean = lean
        self.pool = pool
        self.device = pool.device
        self.max_keys = max_keys
        self.key_buckets = key_buckets(max_keys)
        self.graphs: dict[tuple[int, int, int], _Graph] = {}
        self.chains: dict[tuple[int, int, int, int, str], _Chain] = {}  # (rows, steps, keys buckets, vocab, mode)
        self._chain_io: dict[int, torch.Tensor] = {}  # rows bucket -> sampled chains' q
        self.verifies: dict[tuple, _Verify] = {}  # (rows, tokens buckets, vocab, dtype, truncate, q): run_verify
        self._verify_io: dict[tuple, tuple[torch.Tensor, ...]] = {}  # (rows bucket, vocab, dtype) -> shared inputs
        self._io: torch.Tensor | None = None  # the forward graphs' inputs (``_staging``)
        self.mempool = None
        self.stream = None
        self.failed: str | None = None
        self.bytes_per_token = 0.0  # the largest device memory a capture took per token of its key (``measured``)
        self.replays = 0
        self.chain_replays = 0
        self.verify_replays = 0
        self.eager_uses: dict[tuple, int] = {}  # shapes without a graph yet: eager steps so far
        self.capture_after = int(os.environ.get("HELIX_GRAPH_CAPTURE_AFTER", CAPTURE_AFTER))
        self.prefill_graphs = os.environ.get("HELIX_PREFILL_GRAPHS", "1") != "0"  # prompt chunks' graphs (0: eager)

    def graph_key(self, rows: int, tokens: int, keys: int, aux_layers: tuple[int, ...] | None = None,
                  keep: int | None = None) -> tuple[int, int, int, tuple[int, ...] | None] | None:
        """The key (rows, tokens, keys buckets, aux layers) of the graph this step replays (or now captures: ``graph``);
        None: run it eagerly. ``keep``: the logits each row needs (its last ``keep`` positions; None: every token's);
        rows of more than MAX_TOKENS_PER_ROW tokens replay a prompt chunk's graph only where one is enough."""
        r, t = bucket(rows, ROW_BUCKETS), bucket(keys, self.key_buckets)
        if self.failed is not None or r is None or t is None:
            return None
        m = self.tokens_bucket(r, tokens, t, keep)
        if m is None:
            return None
        key = (r, m, t, aux_layers)
        if key in self.graphs:
            return key
        return key if not self.not_yet(key) and memory_for_graphs(self.device, graph_need(self, key)) else None

    def tokens_bucket(self, r: int, tokens: int, t: int, keep: int | None = None) -> int | None:
        """The tokens bucket of rows of ``tokens`` tokens (``r`` rows bucket, ``t`` keys bucket) that need their last
        ``keep`` logits; None where no graph runs them. Buckets past MAX_TOKENS_PER_ROW are prompt chunks' graphs,
        which return the last logits of each row only."""
        if tokens <= MAX_TOKENS_PER_ROW:
            return bucket(tokens, TOKEN_BUCKETS)
        if keep != 1 or t > PREFILL_MAX_KEYS or not self.prefill_graphs:
            return None
        m = bucket(tokens, PREFILL_TOKEN_BUCKETS)
        return m if m is not None and r * m <= PREFILL_GRAPH_TOKENS else None

    def chain_key(self, rows: int, steps: int, keys: int, vocab: int, mode: str = "greedy"
                  ) -> tuple[int, int, int, int, str] | None:
        """The key (rows bucket, steps, keys bucket, vocab, mode) of the graph a chain of ``steps`` drafting steps runs
        as (``chain``, ``replay_chain``); None: the caller drafts step by step. ``mode``: "greedy", or "sample" /
        "sample-cut" (top-p / top-k cuts), up to MAX_SAMPLED_CHAIN_ROWS rows. Captured on the second use of a shape,
        as ``graph_key`` has it."""
        r, t = bucket(rows, ROW_BUCKETS), bucket(keys, self.key_buckets)
        if self.failed is not None or r is None or t is None or not 1 <= steps <= MAX_CHAIN_STEPS \
                or (mode != "greedy" and r > MAX_SAMPLED_CHAIN_ROWS):
            return None
        key = (r, steps, t, vocab, mode)
        if key in self.chains:
            return key
        return key if not self.not_yet(key) and memory_for_graphs(self.device, graph_need(self, key)) else None

    def not_yet(self, key: tuple) -> bool:
        """Counts a use of a shape that has no graph yet: True while it is still to run without one (its first
        ``capture_after`` uses: a shape met once may never come back, and is not worth a capture), and then counted
        as a one-off (the step does not run as it will once captured, so it times nothing for adaptive K)."""
        uses = self.eager_uses.get(key, 0)
        if uses >= self.capture_after:
            return False
        self.eager_uses[key] = uses + 1
        GraphRunner.one_offs += 1
        return True

    def prewarm(self, max_rows: int, keys: int, aux_layers: tuple[int, ...] | None = None) -> int:
        """Capture every (rows bucket up to ``max_rows``, tokens bucket) shape at the key bucket of ``keys`` now;
        returns how many were captured. These are the shapes decode, drafting and verification meet first, and
        each costs an eager step and a capture (tens of ms) when first met: on an H200 at batch 8, three such
        one-offs (a batch tail of 4 rows at a new K, a K not run at 8 rows yet) took 39% of a timed pass."""
        t = bucket(keys, self.key_buckets)
        if t is None or self.failed is not None:
            return 0
        return self._capture_all((r, m, t, aux_layers) for r in ROW_BUCKETS if r <= max_rows for m in TOKEN_BUCKETS)

    def prewarm_prefill(self, max_rows: int, keys: int, aux_layers: tuple[int, ...] | None = None,
                        max_tokens: int = PREWARM_PREFILL_TOKENS) -> int:
        """``prewarm`` for the prompt chunks of ``prefill_shapes(max_rows, max_tokens)`` (requests arriving alone or
        together: their prefill, and a draft model reading their prompts) at the key bucket of ``keys``; returns how
        many were captured."""
        t = bucket(keys, self.key_buckets)
        if t is None or self.failed is not None or t > PREFILL_MAX_KEYS or not self.prefill_graphs:
            return 0
        return self._capture_all((r, m, t, aux_layers) for r, m in prefill_shapes(max_rows, max_tokens))

    def _capture_all(self, keys) -> int:
        """Capture the forward graphs of ``keys`` not captured yet; returns how many were (``_graph`` stores each and
        records a failure in ``failed``: every step then runs eagerly)."""
        return capture_missing(self, self.graphs, ((key, lambda key=key: self.graph(key)) for key in keys))

    def prewarm_chains(self, max_rows: int, keys: int, vocab: int, modes: tuple[str, ...] = PREWARM_CHAIN_MODES) -> int:
        """``prewarm`` for the drafting chains (``replay_chain``) of every K: (rows bucket up to ``max_rows``, steps
        1..MAX_CHAIN_STEPS, each of ``modes``) at the key bucket of ``keys``; returns how many were captured."""
        t = bucket(keys, self.key_buckets)
        if t is None or self.failed is not None:
            return 0
        return capture_missing(self, self.chains, (((r, steps, t, vocab, mode),
                                                     lambda r=r, steps=steps, mode=mode: self._capture_chain(r, steps, t, vocab, mode))
                                                    for r, steps, mode in chain_shapes(max_rows, modes)))

    def graph(self, key: tuple[int, int, int, tuple[int, ...] | None]) -> _Graph:
        """The forward graph of ``key`` (``graph_key``), captured now if it is not yet; a capture that fails sets
        ``failed`` (the runner then stays eager) and raises."""
        return self._held(self.graphs, key, self._capture, "running eagerly")

    def chain(self, key: tuple[int, int, int, int, str]) -> _Chain:
        """The drafting chain graph of ``key`` (``chain_key``), captured now if it is not yet; a capture that fails
        sets ``failed`` (chains then draft step by step) and raises."""
        return self._held(self.chains, key, self._capture_chain, "drafting step by step")

    def _held(self, store: dict, key: tuple, capture, fallback: str):
        got = store.get(key)
        if got is None:
            try:
                got = store[key] = measured(self, key, lambda: capture(*key))
            except Exception as exc:  # an op that cannot be captured, or no memory left: no graphs from now on
                release_graphs(self, f"{type(exc).__name__}: {exc}")
                logger.warning("CUDA graph capture failed, %s: %s", fallback, self.failed)
                raise
        return got

    def _staging(self) -> torch.Tensor:
        """One buffer holding every forward graph's inputs (graphs replay one at a time): a graph of R rows, N tokens and
        B table blocks reads its table ``[R, B]`` first, then its ids, positions and slots ``[R, N]`` each, so that a
        forward's host copy of them (``load``) is one copy."""
        if self._io is None:
            nb = -(-self.key_buckets[-1] // self.pool.block_size)
            r = ROW_BUCKETS[-1]
            size = r * nb + 3 * max(r * MAX_TOKENS_PER_ROW, PREFILL_GRAPH_TOKENS) + IO_EXTRA
            self._io = torch.zeros(size, dtype=torch.long, device=self.device)
        return self._io

    def load(self, g: _Graph | _Chain, values: list[int]) -> torch.Tensor:
        """A forward's ``values`` on the device: ``g``'s inputs (a forward graph's ids, positions and slots, ``[R, N]``
        each as ``g`` pads them; a chain's positions ``[R]`` and slots ``[S, R]``), then what the forward reads after
        them, in one host copy into the staging right after ``g``'s table; returns them (a view of the staging, or a
        copy of its own where they do not fit: its inputs then copied over)."""
        io, at = self._staging(), g.table.numel()
        inputs = 3 * g.slots.numel() if isinstance(g, _Graph) else g.start.numel() + g.slots.numel()
        host = torch.tensor(values, dtype=torch.long)
        if self._fits(at, len(values)):
            out = io[at: at + len(values)]
            out.copy_(host, non_blocking=True)
            return out
        out = host.to(self.device, non_blocking=True)
        io[at: at + inputs].copy_(out[:inputs])
        return out

    def _fits(self, at: int, n: int) -> bool:
        """Whether ``n`` values from ``at`` fit in the staging (``load``)."""
        return at + n <= self._staging().numel()

    def replay(self, g: _Graph, rows: int, tokens: int, keep: int) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``g`` replayed over what ``load`` and the block tables (``DeviceBlockTables.read`` into ``g.table``) put in
        its inputs; same contract as ``lean.forward`` for the first ``rows`` rows of ``tokens`` tokens (with aux
        layers: logits and the features of every new token)."""
        g.graph.replay()
        self.replays += 1
        logits = g.logits[:rows, g.logits.shape[1] - keep:].clone()  # the next replay overwrites the output buffers
        return logits if g.hidden is None else (logits, g.hidden[:rows, g.input_ids.shape[1] - tokens:].clone())

    def _capture(self, r: int, n: int, t: int, aux_layers: tuple[int, ...] | None = None) -> _Graph:
        io = self._staging()
        at = r * -(-t // self.pool.block_size)
        table = io[:at].view(r, -1)
        input_ids, positions = io[at: at + r * n].view(r, n), io[at + r * n: at + 2 * r * n].view(r, n)
        slots = io[at + 2 * r * n: at + 3 * r * n]
        # the warm-up calls before the capture run the forward over them: its K/V written to the scratch slot only
        table.fill_(self.pool.scratch_block)
        input_ids.zero_()
        positions.zero_()
        slots.fill_(self.pool.scratch_slot)
        keep = n if n <= MAX_TOKENS_PER_ROW else 1  # a prompt chunk's graph: each row's last logits

        def step():
            # the rows' key slots and mask from the static table and positions, in the graph: built eagerly they were
            # ~8 launches of every replay, on the host of a launch-bound step
            batch = AttnBatch(slots, key_slots(table, t, self.pool.block_size).reshape(-1), causal_mask(positions, t), t)
            batch = self.lean.window_batch(batch, table, positions, self.pool.block_size)
            return self.lean.forward(input_ids, positions, batch, self.pool, keep, aux_layers)

        graph, out = capture(step, self.device, *self._stream(), keys=t)
        logits, hidden = out if aux_layers is not None else (out, None)
        logger.debug("captured a CUDA graph: %d rows x %d tokens, %d keys%s", r, n, t, ", aux" if hidden is not None else "")
        return _Graph(graph, input_ids, positions, slots, table, logits, hidden)

    def replay_chain(self, c: _Chain, first: torch.Tensor, vocab: int, sampling: ChainSampling | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A draft's K draws and its forwards 2..K in one replay, with no host round trip between them: row ``i``
        draws its first token from ``first[i]`` (its logits after its last verified token, ``[B, >= vocab]``; over
        the first ``vocab``), feeds it at position ``start[i]``, draws the next from the logits it gets, and so on:
        the argmax, or with ``sampling`` the race of engine.sampler under the row's settings and keys (a row with
        temperature 0 takes the argmax). Its positions, the slots where each of its S = K - 1 forwards writes each row's
        K/V (reserved by the caller) and the rows' block tables are in ``c``'s inputs (``load``; the tables read into
        ``c.table``). Returns the ``[B, K]`` tokens and, when sampling, the draft distributions ``[B, K, V]``, on the
        device.

        Step by step, each drafting step of a small draft model was a forward launched from the host, a device
        sync and a host copy of its tokens: on an H200 (TinyLlama shape, a 2-layer draft, batch 1) 0.68 ms a step,
        most of it the host's, beside a 2 ms verification. The first draw in the graph too: eagerly its noise and
        race were ~25 launches of a sampled step (on an H200, demo pair, 8 rows: a K = 4 step at T = 0.8 took
        4.3-4.5 ms against 3.3-3.5 greedy)."""
        b = first.shape[0]
        c.first[:b].copy_(first[:, :vocab])
        cs = c.sampling
        if cs is not None:
            cs.load(sampling)
        c.graph.replay()
        self.chain_replays += 1
        return c.out[:b].clone(), (cs.probs[:b].clone() if cs is not None else None)

    def run_verify(self, logits: torch.Tensor, drafts: list[list[int]], settings: list[list[float]],
                   sample_keys: list[list[int]], accept_keys: list[list[int]] | None, q: torch.Tensor | None,
                   truncate: bool, drafted: torch.Tensor | None = None, drafters: list[int] = ()
                   ) -> list[list[int]] | None:
        """A sampled step's verification (engine.rejection ``verify_rows``) as one graph replay: the target's
        ``logits`` ``[B, N, V]`` (N = K + 1), each row's draft tokens (up to K), ``settings`` (temperature, top_p,
        top_k, seeded), keys of its N draws and K acceptance tests (engine.rng.key; None: no row tests), the draft
        distributions ``q`` ``[B, K, V]`` (None: one-hot proposals). Returns each row's [accepted, tokens...] on the
        host (the step's one copy), or None where no graph runs it yet (a shape's first use, as ``graph_key``; more rows
        than the buckets): the caller verifies eagerly.

        Eagerly a sampled verification is ~40 small launches (probabilities, the race's noise, the acceptance tests),
        each paid on the host of a launch-bound step: on an H200 (demo pair, fp16, 8 rows) a plain step at T = 0.8
        took 1.86 ms against 1.53 greedy."""
        b, n, v = logits.shape
        r, m = bucket(b, ROW_BUCKETS), bucket(n, TOKEN_BUCKETS)
        if self.failed is not None or r is None or m is None:
            return None
        key = (r, m, v, logits.dtype, truncate, q is not None)
        g = self.verifies.get(key)
        if g is None:
            if self.not_yet(key) or not memory_for_graphs(self.device, graph_need(self, key)):
                return None
            try:
                g = self.verifies[key] = measured(self, key, lambda: self._capture_verify(*key))
            except Exception as exc:
                release_graphs(self, f"{type(exc).__name__}: {exc}")
                logger.warning("CUDA graph capture of a verification failed, running eagerly: %s", self.failed)
                return None
        km = m - 1  # each row: its drafts padded with -1, their count, its sample keys, its accept keys (or 0s)
        rows = [d + [-1] * (km - len(d)) + [len(d)] + sk + sk[-1:] * (m - len(sk)) + ak + [0] * (km - len(ak))
                for d, sk, ak in zip(drafts, sample_keys, accept_keys or [[]] * b)]
        g.logits[:b, :n].copy_(logits)
        g.ints[:b].copy_(torch.tensor(rows, dtype=torch.long), non_blocking=True)
        if drafted is not None:  # rows ``drafters``' drafts on the device; ``drafts`` holds placeholders (0) there.
            # Only those rows are written: the others' drafts (n-gram's, beside a model's chain) came from the host
            k = min(drafted.shape[1], km)
            cur = g.ints[:b, :k]
            if len(drafters) == b:  # every row, in order
                cur.copy_(torch.where(cur >= 0, drafted[:, :k], cur))  # -1 past a row's own K stays
            else:
                at = torch.tensor(drafters).to(self.device, non_blocking=True)
                held = cur.index_select(0, at)
                cur.index_copy_(0, at, torch.where(held >= 0, drafted[:, :k], held))
        g.settings[:b].copy_(torch.tensor(settings, dtype=torch.float32), non_blocking=True)
        g.settings[b:].zero_()  # padding rows: greedy, no draft
        if q is not None:
            g.q[:b, : n - 1].copy_(q)
        g.graph.replay()
        self.verify_replays += 1
        return g.out[:b].tolist()

    def _capture_verify(self, r: int, m: int, vocab: int, dtype: torch.dtype, truncate: bool, with_q: bool) -> _Verify:
        from engine.rejection import verify_rows

        dev, km = self.device, m - 1
        io = self._verify_io.get((r, vocab, dtype))
        if io is None:  # the verification graphs of a rows bucket read views of the same vocabulary-wide inputs
            io = self._verify_io[(r, vocab, dtype)] = (
                torch.zeros(r, MAX_TOKENS_PER_ROW, vocab, dtype=dtype, device=dev), torch.zeros(r, 4, device=dev),
                torch.zeros(r, MAX_TOKENS_PER_ROW - 1, vocab, device=dev))
        logits, settings, q = io[0][:, :m], io[1], io[2][:, :km] if with_q else None
        # its own: a padding row's stale ints must be of this layout (another's keys would index as tokens)
        ints = torch.zeros(r, 3 * m - 1, dtype=torch.long, device=dev)

        def verify() -> torch.Tensor:
            return verify_rows(logits, ints[:, :km], ints[:, km], q, settings, ints[:, km + 1: km + 1 + m],
                               ints[:, km + 1 + m:], truncate)

        graph, out = capture(verify, dev, *self._stream(), keys=0)
        logger.debug("captured a CUDA graph of a verification: %d rows x %d tokens%s%s", r, m,
                     ", top-p/top-k" if truncate else "", ", q" if with_q else "")
        return _Verify(graph, logits, ints, settings, q, out)

    def prewarm_verify(self, max_rows: int, vocab: int, dtype: torch.dtype) -> int:
        """Capture the verification graphs (``run_verify``) of sampled steps without top-p / top-k cuts (requests'
        default sampling), seeded and not, rows buckets up to ``max_rows``, every tokens bucket; returns how many."""
        if self.failed is not None:
            return 0
        keys = [(r, m, vocab, dtype, False, with_q) for with_q in (False, True) for r in ROW_BUCKETS if r <= max_rows
                for m in TOKEN_BUCKETS if with_q is False or m > 1]
        return capture_missing(self, self.verifies, ((key, lambda key=key: self._capture_verify(*key)) for key in keys))

    def _stream(self) -> tuple[torch.cuda.Stream, tuple]:
        """The side stream and the memory pool every graph of this runner is captured on."""
        if self.stream is None:
            self.stream = torch.cuda.Stream(self.device)
            self.mempool = torch.cuda.graph_pool_handle()
        return self.stream, self.mempool

    def _capture_chain(self, r: int, steps: int, t: int, vocab: int, mode: str = "greedy") -> _Chain:
        dev = self.device
        first = torch.zeros(r, vocab, device=dev)  # float32: the logits of any dtype, exactly
        io = self._staging()  # its table, then its positions and slots, as a forward graph's (``load``)
        at = r * -(-t // self.pool.block_size)
        table, start = io[:at].view(r, -1), io[at: at + r]
        slots = io[at + r: at + r + steps * r].view(steps, r)
        table.fill_(self.pool.scratch_block)  # the warm-up calls before the capture write the scratch slot only
        start.zero_()
        slots.fill_(self.pool.scratch_slot)
        cs = None if mode == "greedy" else ChainSampling.buffers(self._chain_io, r, steps + 1, vocab, dev,
                                                                 mode == "sample-cut")

        def chain() -> torch.Tensor:
            gather = key_slots(table, t, self.pool.block_size).reshape(-1)  # in the graph, as ``_capture``'s
            cur = first.argmax(-1)
            if cs is not None:
                cur = cs.draw(0, first, cur)
            out = [cur]
            for s in range(steps):
                pos = (start + s).view(r, 1)
                batch = self.lean.window_batch(AttnBatch(slots[s], gather, causal_mask(pos, t), t), table, pos,
                                               self.pool.block_size)
                logits = self.lean.forward(cur.view(r, 1), pos, batch, self.pool, 1)[:, 0, :vocab]  # [R, V]
                cur = logits.argmax(-1)
                if cs is not None:
                    cur = cs.draw(s + 1, logits, cur)
                out.append(cur)
            return torch.stack(out, 1)

        graph, out = capture(chain, dev, *self._stream(), keys=t)
        logger.debug("captured a CUDA graph of a %s drafting chain: %d rows x %d steps, %d keys", mode, r, steps, t)
        return _Chain(graph, first, start, slots, table, out, cs)
