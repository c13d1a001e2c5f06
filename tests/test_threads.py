"""CPU thread count per step: big steps run on every core only while measuring shows they gain."""

import torch

from engine.threads import BIG_TOKENS, MIN_TOKENS, RETRY, StepThreads
from tests.tiny import tiny_engine


def _restore(fn):
    def wrapped(*a, **k):
        before = torch.get_num_threads()
        try:
            return fn(*a, **k)
        finally:
            torch.set_num_threads(before)
    wrapped.__name__ = fn.__name__
    return wrapped


@_restore
def test_big_steps_take_the_faster_thread_count_and_look_again():
    torch.set_num_threads(1)
    st = StepThreads(1, 2)
    assert st.choose(BIG_TOKENS - 1) == 1  # small steps keep the default
    first = [st.choose(32) for _ in range(2)]
    assert first[0] == 2 and torch.get_num_threads() == 2 and st.exploring  # untried counts are tried first
    st.observe(2, 32, 0.032)  # 1 ms a token on two threads
    assert st.choose(32) == 1 and torch.get_num_threads() == 1
    st.observe(1, 32, 0.016)  # 0.5 ms a token on one: one thread wins (a busy machine)
    picks = [(st.choose(40), st.exploring) for _ in range(2 * RETRY)]
    assert picks.count((2, True)) == 2 and picks.count((1, False)) == 2 * RETRY - 2  # two threads are tried again
    # now and then, and such steps say so (the engine does not time them for adaptive K: they would bias it)
    for _ in range(10):  # the other process is gone: two threads are much faster again
        st.observe(2, 40, 0.004)
    assert st.choose(33) == 2
    assert st.choose(1) == 1 and torch.get_num_threads() == 1
    assert st._bucket(8) == ("prefill", 8, 1) and st._bucket(15, 8) == ("prefill", 8, 8)
    assert st._bucket(64, 3, "verify") == ("verify", 64, 2)
    st.observe(2, 8, 0.016, rows=1, phase="verify")  # one row verifying 8 tokens is its own bucket: 8 rows' times
    assert st.avg[(("verify", 8, 1), 2)] == 0.002 and (("verify", 8, 8), 2) not in st.avg  # do not decide it


@_restore
def test_phases_choose_apart():
    """A verification of a few tokens may take every core while the one-row draft steps before it keep one."""
    torch.set_num_threads(1)
    st = StepThreads(1, 2)
    assert MIN_TOKENS["verify"] < MIN_TOKENS["draft"]
    assert st.choose(1, 1, "draft") == 1 and not st.exploring  # one drafting row: a small step
    assert st.choose(5, 1, "verify") == 2 and st.exploring  # one row verifying K = 4: measured
    st.observe(2, 5, 0.005, 1, "verify")
    assert st.choose(5, 1, "verify") == 1 and st.exploring
    st.observe(1, 5, 0.010, 1, "verify")  # two threads verify twice as fast
    assert st.choose(6, 1, "verify") == 2 and not st.exploring
    assert (("verify", 4, 1), 2) in st.avg and not any(b[0] == "draft" for b, _ in st.avg)
    assert st.choose(8, 8, "draft") == 2 and st.exploring  # eight drafting rows: measured in their own bucket
    st.observe(2, 8, 0.004, 8, "draft", per_tokens=32)  # 8 rows x K = 4 drafted: per drafted token
    assert st.avg[(("draft", 8, 8), 2)] == 0.004 / 32
    assert st.choose(1, 1, "verify") == 1  # plain decode of one row: small


def test_disabled_off_the_cpu_and_by_the_setting():
    assert not StepThreads.for_device(torch.device("cpu"), 0).enabled
    assert not StepThreads.for_device(torch.device("cuda"), None).enabled
    st = StepThreads(2, 2)
    assert not st.enabled and st.choose(100) == 2


@_restore
def test_engine_measures_big_steps_and_shows_them():
    torch.set_num_threads(1)
    eng = tiny_engine()
    eng.threads = StepThreads(1, 2)
    from engine import SamplingParams

    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, num_draft_tokens=4)
    for _ in range(3):
        eng.add_request(list(range(3, 40)), params)  # 3 rows x 5 positions = 15 tokens a step; prefill 111
    while eng.has_work():
        eng.step()
    buckets = {b for b, _n in eng.threads.avg}
    assert ("verify", 8, 2) in buckets and ("prefill", 64, 2) in buckets, eng.threads.avg  # 3 rows x 5; 3 prompts
    snap = eng.snapshot()["threads"]
    assert snap["default"] == 1 and snap["big_steps"] == 2 and snap["ms_per_token"]
    assert torch.get_num_threads() in (1, 2)


@_restore
def test_a_near_tie_does_not_flip_the_count():
    torch.set_num_threads(1)
    st = StepThreads(1, 2)
    st.choose(16), st.observe(2, 16, 0.0160)  # 1.00 ms a token on all cores
    st.choose(16), st.observe(1, 16, 0.0152)  # 0.95 on one: faster, but within the noise
    assert st.choose(16) == 2 and not st.exploring
    for _ in range(10):
        st.observe(1, 16, 0.008)  # 0.5 ms a token: clearly faster (another process took a core)
    assert st.choose(16) == 1


@_restore
def test_each_proposer_drafts_at_the_count_measured_for_it():
    """The draft model's forwards and the EAGLE head's are different work: a step's draft phase is timed and chosen in
    a bucket of its proposer's. In one bucket their times per drafted token mixed (the head's 0.13 ms a token on two
    threads here against the draft model's 0.21), and which count looked faster followed which proposer had drafted
    at it: at 8 clients on the 2-core CPU the default drafted with the head in some rounds and with the draft model in
    others."""
    torch.set_num_threads(1)
    st = StepThreads(1, 2)
    for threads, kind, per_token in ((2, "model", 0.21e-3), (1, "model", 0.30e-3),  # the model: two threads
                                     (2, "eagle", 0.13e-3), (1, "eagle", 0.10e-3)):  # the head: one
        st.choose(8, 8, "draft", kind)
        st.observe(threads, 8, per_token * 24, 8, "draft", per_tokens=24, kind=kind)
    assert st.choose(8, 8, "draft", "model") == 2 and st.choose(8, 8, "draft", "eagle") == 1
    assert st._bucket(8, 8, "draft", "eagle") == ("draft:eagle", 8, 8) and st._bucket(8, 8, "draft")[0] == "draft"


@_restore
def test_the_engine_times_each_proposers_drafts_apart():
    torch.set_num_threads(1)
    eng = tiny_engine()
    eng.threads = StepThreads(1, 2)
    from engine import SamplingParams

    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True, num_draft_tokens=2,
                            draft_method="model")
    for _ in range(8):
        eng.add_request(list(range(3, 20)), params)  # 8 drafting rows a step: a big draft phase
    while eng.has_work():
        eng.step()
    assert {b[0] for b, _n in eng.threads.avg if b[0].startswith("draft")} == {"draft:model"}, eng.threads.avg
