"""Which steps replay which CUDA graph shapes: the bucket logic of engine.cuda_graphs, checked on any machine (the
graphs themselves are tested on CUDA in test_cuda_graphs.py)."""

import contextlib
import types

import torch

import engine.cuda_graphs as cg
from engine.cuda_graphs import (
    MAX_TOKENS_PER_ROW,
    PREFILL_GRAPH_TOKENS,
    PREFILL_MAX_KEYS,
    PREFILL_TOKEN_BUCKETS,
    GraphRunner,
    capture_missing,
    chain_shapes,
    prefill_shapes,
)


def _runner(monkeypatch, prefill: bool = True) -> GraphRunner:
    monkeypatch.setenv("HELIX_PREFILL_GRAPHS", "1" if prefill else "0")
    pool = types.SimpleNamespace(device=torch.device("cpu"))  # graph_key() and tokens_bucket() never touch the device
    return GraphRunner(lean=None, pool=pool, max_keys=4096)


def test_prompt_chunks_take_a_bucket_at_most_one_and_a_half_times_their_length(monkeypatch):
    g = _runner(monkeypatch)
    assert all(b / a <= 1.5 for a, b in zip(PREFILL_TOKEN_BUCKETS, PREFILL_TOKEN_BUCKETS[1:]))
    assert PREFILL_TOKEN_BUCKETS[0] > MAX_TOKENS_PER_ROW
    for n in range(MAX_TOKENS_PER_ROW + 1, PREFILL_GRAPH_TOKENS + 1):
        m = g.tokens_bucket(1, n, 512, keep=1)
        assert m is not None and n <= m <= max(16, 1.5 * n), n


def test_only_short_prompt_chunks_that_keep_one_logit_replay_a_graph(monkeypatch):
    g = _runner(monkeypatch)
    assert g.tokens_bucket(8, 5, 256, keep=5) == 5  # a verification: every token's logits, its own buckets
    assert g.tokens_bucket(1, 40, 256, keep=1) == 48
    assert g.tokens_bucket(1, 40, 256, keep=2) is None  # more than the last logits: eager
    assert g.tokens_bucket(8, 40, 256, keep=1) == 48  # 8 rows x 48 padded tokens = 384
    assert g.tokens_bucket(8, 70, 256, keep=1) is None  # 8 x 96 > PREFILL_GRAPH_TOKENS: eager
    assert g.tokens_bucket(1, 600, 1024, keep=1) is None  # past the largest bucket
    assert g.tokens_bucket(1, 40, PREFILL_MAX_KEYS + 256, keep=1) is None  # a chunk deep into a long context
    assert _runner(monkeypatch, prefill=False).tokens_bucket(1, 40, 256, keep=1) is None  # HELIX_PREFILL_GRAPHS=0


def test_warm_up_chain_shapes_cover_every_k_greedy_and_sampled():
    shapes = list(chain_shapes(8, ("greedy", "sample")))
    assert len(shapes) == len(set(shapes)) == 2 * 4 * 7
    assert {r for r, _, _ in shapes} == {1, 2, 4, 8} and {s for _, s, _ in shapes} == set(range(1, 8))
    assert all(r <= 8 for r, _, m in shapes if m == "sample")
    assert {r for r, _, _ in chain_shapes(32, ("greedy",))} == {1, 2, 4, 8, 16, 32}
    assert {r for r, _, _ in chain_shapes(32, ("sample",))} == {1, 2, 4, 8}  # sampled chains up to 8 rows


def test_warm_up_prompt_chunks_cover_requests_admitted_together(monkeypatch):
    """Warm-up captures the prompt chunks of 1-8 rows that a step of requests admitted together meets: every such
    chunk of up to PREWARM_PREFILL_TOKENS tokens a row replays a graph captured then (none is left to a timed pass)."""
    g = _runner(monkeypatch)
    shapes = set(prefill_shapes(8, 128))
    assert {r for r, _ in shapes} == {1, 2, 4, 8} and all(r * m <= PREFILL_GRAPH_TOKENS for r, m in shapes)
    for rows in range(1, 9):
        r = next(b for b in (1, 2, 4, 8) if b >= rows)  # graph_key() buckets the rows first
        for n in range(MAX_TOKENS_PER_ROW + 1, 129):
            m = g.tokens_bucket(r, n, 256, keep=1)
            if m is not None:
                assert (r, m) in shapes, (rows, n)
    assert max(m for r, m in shapes if r == 8) == 64 and max(m for r, m in shapes if r == 1) == 128


def test_graphs_are_captured_only_while_the_device_keeps_room_for_eager_steps(monkeypatch):
    """Graphs hold their own memory: the warm-up stops capturing, and a step met for the second time runs eagerly
    instead of capturing, once the device's free memory falls under the reserve (``memory_for_graphs``); graphs
    already held keep replaying. The reserve reads CUDA's free memory plus what torch's allocator holds unused."""
    g = _runner(monkeypatch)
    room = {"left": 2}

    def fake_graph(key):
        g.graphs[key] = object()
        room["left"] -= 1
        return g.graphs[key]

    g.graph = fake_graph
    monkeypatch.setattr(cg, "memory_for_graphs", lambda device, need=0.0: room["left"] > 0)
    assert g._capture_all([(1, m, 256, None) for m in (1, 2, 3, 5)]) == 2  # then no room: the rest stay eager
    assert set(g.graphs) == {(1, 1, 256, None), (1, 2, 256, None)} and g.failed is None
    assert g.graph_key(1, 2, 200) == (1, 2, 256, None)  # held: replays
    g.capture_after = 0
    assert g.graph_key(1, 3, 200) is None  # not held, no room: eager, and nothing recorded as failed
    room["left"] = 1
    assert g.graph_key(1, 3, 200) == (1, 3, 256, None)  # room again: captured as steps meet it
    # the reserve itself: 10% of the device, at least 2 GiB, counting the allocator's unused cache as free
    monkeypatch.undo()
    gib = 1 << 30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (5 * gib, 80 * gib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: 12 * gib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 10 * gib)
    assert cg.memory_for_graphs(torch.device("cuda")) is False  # 7 GiB free of 80: under the 8 GiB reserve
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: 8 * gib)
    assert cg.memory_for_graphs(torch.device("cuda")) is True  # 9 GiB
    assert cg.memory_for_graphs(torch.device("cuda"), need=2 * gib) is False  # ... but not after a 2 GiB capture
    assert cg.memory_for_graphs(torch.device("cpu")) is True
    # the capture's size: the largest growth per token (rows x tokens of its key) a capture of the runner showed, but
    # its first (which also allocates the side stream's workspace and the inputs' staging, for every later one)
    runner = types.SimpleNamespace(device=torch.device("cuda"), bytes_per_token=0.0)
    sizes = iter([10 * gib, 10 * gib + 72 * (20 << 20), 11 * gib, 11 * gib + 16 * (5 << 20)])
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: next(sizes))
    assert cg.measured(runner, (1, 1, 256, None), lambda: "first") == "first" and runner.bytes_per_token == 0.0
    assert cg.graph_need(runner, (8, 9, 256, None)) == 0.0  # nothing measured yet
    assert cg.measured(runner, (8, 9, 256, None), lambda: "graph") == "graph"
    assert runner.bytes_per_token == 20 << 20  # 72 tokens took 1.4 GiB
    cg.measured(runner, (1, 16, 256, None), lambda: "graph")  # 5 MiB a token: the largest stays
    assert cg.graph_need(runner, (8, 64, 256, None)) == 512 * (20 << 20)


def test_warm_up_captures_what_is_missing_and_stops_at_the_first_failure(monkeypatch):
    """``capture_missing`` (forward graphs, both proposers' drafting chains): keys already held are not captured again;
    the first capture that raises is recorded in ``failed``, no later one runs, and the graphs held are dropped (the
    runner is eager from then on: their memory serves its steps)."""
    g = _runner(monkeypatch)
    calls = []

    def fake_graph(key):
        calls.append(key)
        if key[1] == 3:
            raise RuntimeError("cannot capture")
        g.graphs[key] = object()
        return g.graphs[key]

    g.graph = fake_graph
    g.graphs[(1, 1, 256, None)] = held = object()
    keys = [(1, m, 256, None) for m in (1, 2, 3, 5)]
    assert g._capture_all(keys) == 1  # (1, 2) captured, (1, 3) failed, (1, 5) never tried
    assert calls == [(1, 2, 256, None), (1, 3, 256, None)] and held is not None and g.graphs == {}
    assert g.failed == "RuntimeError: cannot capture" and g.graph_key(1, 1, 200) is None
    store = {}
    owner = types.SimpleNamespace(failed=None)
    assert capture_missing(owner, store, [("a", lambda: 1), ("a", lambda: 2), ("b", lambda: 3)]) == 2
    assert store == {"a": 1, "b": 3} and owner.failed is None



def test_a_capture_records_no_backward(monkeypatch):
    """A model's weights are parameters that require grad: a forward captured with autograd on keeps every tensor it
    saves for a backward alive as long as the graph's static output lives (for good). ``capture`` runs the warm-up
    calls and the capture without autograd, whatever mode its caller is in (the engine's warm-up captures outside the
    runner's inference mode). The CUDA calls are stood in for here; test_cuda_graphs.py measures the memory on CUDA."""
    stream = types.SimpleNamespace(wait_stream=lambda other: None)
    modes = []

    class Graph:
        pass

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Graph)
    monkeypatch.setattr(torch.cuda, "graph", lambda graph, pool=None, stream=None: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    layer = torch.nn.Linear(8, 8)
    assert layer.weight.requires_grad and torch.is_grad_enabled()

    def fn():
        modes.append(torch.is_grad_enabled())
        return torch.relu(layer(torch.ones(2, 8))) * 2

    graph, out = cg.capture(fn, torch.device("cpu"), stream, None, keys=256)
    assert isinstance(graph, Graph) and modes == [False, False, False]  # two warm-up calls, then the capture
    assert out.grad_fn is None and not out.requires_grad
