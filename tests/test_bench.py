"""The bench and the doctor on tiny models: end to end in seconds, every JSON field, clear user errors."""

import json
import statistics

import pytest

import main
from engine.bench import instrument as instrument_mod
from engine.bench.doctor import DoctorReport, diagnose
from engine.bench.instrument import Instrument
from engine.bench.prompts import load_prompts
from engine.bench.report import evaluate_targets, format_results
from engine.bench.suite import QUICK, run_bench
from tests.tiny import tiny_engine, tiny_llama, tiny_tokenizer, word_tokenizer

MACHINE_FIELDS = {"cpu_model", "logical_cores", "torch", "transformers", "torch_threads", "device", "dtype",
                  "date_utc", "load_average_1_5_15"}
METHOD_FIELDS = {"name", "backend", "k", "tokens_per_second", "tokens_per_second_runs", "ttft_ms", "acceptance_rate",
                 "mean_acceptance_length", "speedup_vs_plain", "speedup_vs_hf_assisted", "predicted_speedup",
                 "measured_over_predicted", "alpha", "mean_k"}
EXPECTED_METHODS = {"helix plain", "helix spec K=1", "helix spec K=2", "helix spec adaptive", "hf generate plain",
                    "hf assisted default"}


@pytest.fixture(scope="module")
def quick_results():
    engine = tiny_engine()
    engine.warmup()
    return run_bench(engine, load_prompts(), QUICK, progress=False)


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_models")
    tok = tiny_tokenizer()
    for name, layers in (("target", 2), ("draft", 1)):
        tiny_llama(len(tok), layers=layers, seed=layers).save_pretrained(root / name)
        tok.save_pretrained(root / name)
    tiny_llama(8, layers=1).save_pretrained(root / "other")
    word_tokenizer(8).save_pretrained(root / "other")
    return root


def _assert_method_fields(method: dict) -> None:
    missing = METHOD_FIELDS - set(method)
    assert not missing, f"{method['name']} lacks {missing}"
    assert method["tokens_per_second"] > 0 and method["ttft_ms"] > 0


def test_quick_bench_json_has_every_field(quick_results):
    r = json.loads(json.dumps(quick_results))  # JSON-ready
    assert MACHINE_FIELDS <= set(r["machine"])
    warm = r["machine"]["warmup"]  # what the engine's warm-up cost: seconds, and CUDA graphs captured (none on a CPU)
    assert warm["seconds"] > 0 and warm["graphs_captured"] == 0 and warm["graph_seconds"] >= 0
    assert {s["temperature"] for s in r["scenarios"]} == {0.0, 0.8}
    for scen in r["scenarios"]:
        names = {m["name"] for m in scen["methods"]}
        assert EXPECTED_METHODS <= names
        assert any(n.startswith("hf assisted constant K=") for n in names)
        for m in scen["methods"]:
            _assert_method_fields(m)
        # a method that never drafted (adaptive K staying plain with this useless random draft) has no cost model
        spec = [m for m in scen["methods"] if m["backend"] == "helix" and m["speculative"] and m["num_drafts"]]
        assert any(m["name"].startswith("helix spec K=") for m in spec)
        assert all(m["predicted_speedup"] is not None and m["alpha"] is not None for m in spec)
        assert {"alpha", "alpha_per_position", "recommended_k", "draft_cost", "verify_cost"} <= set(scen["calibration"])
    assert {(c["concurrency"], c["mode"]) for c in r["concurrency"]} == {
        (n, mode) for n in QUICK.concurrency for mode in ("plain", "speculative")}
    for c in r["concurrency"]:  # each repeat's drafts by proposer (none for plain) and graphs captured (none on the CPU)
        assert len(c["drafts_by_method_runs"]) == len(c["graph_captures_runs"]) == len(c["tokens_per_second_runs"])
        assert all(set(d) <= {"model", "ngram", "eagle"} and all(n > 0 for n in d.values())
                   for d in c["drafts_by_method_runs"])
        if c["mode"] == "plain":
            assert not any(c["drafts_by_method_runs"])
        assert set(c["graph_captures_runs"]) == {0}
    mem = r["memory"]
    assert mem["contiguous_max_length_bytes"] > mem["peak_paged_bytes"] > 0
    assert 0 <= mem["peak_fragmentation"] < 1
    for mode in ("speculative adaptive", "plain"):
        prof = r["profile"]["modes"][mode]
        assert prof["tokens"] > 0 and prof["ms_per_token"]["target_forward"] > 0
        assert sum(prof["share"].values()) == pytest.approx(1.0, abs=0.05)
    assert {t["result"] for t in r["targets"]} <= {"PASS", "MISS"}
    assert {t["target"] for t in r["targets"]} >= {"spec_vs_plain", "plain_vs_hf", "paged_over_stored"}


def test_speculative_greedy_output_equals_plain_in_the_bench(quick_results):
    greedy = next(s for s in quick_results["scenarios"] if s["temperature"] == 0)
    assert greedy["checks"]["speculative_greedy_equals_plain"] is True


def test_tables_name_every_target_with_pass_or_miss(quick_results):
    text = format_results(quick_results)
    for t in quick_results["targets"]:
        assert t["what"] in text
    assert "PASS" in text or "MISS" in text
    assert "| method |" in format_results(quick_results, markdown=True)
    rounds = len(quick_results["concurrency"][0]["tokens_per_second_runs"])  # the rounds the medians are over
    assert ("one round" if rounds == 1 else f"median of {rounds} rounds") in text
    for c in quick_results["concurrency"]:  # an adaptive row's repeats, with what they drafted with
        if c["mode"] == "speculative":
            drafts = ", ".join(f"{m} {n}" for m, n in c["drafts_by_method_runs"][0].items()) or "no drafts"
            assert f"adaptive at {c['concurrency']} concurrent, each repeat: tokens/s (drafts by proposer): " \
                   f"{c['tokens_per_second_runs'][0]:.0f} ({drafts}" in text


def test_targets_say_miss_plainly():
    results = {"scenarios": [{"temperature": 0.0, "max_new_tokens": 128, "methods": [
        {"name": "helix plain", "tokens_per_second": 100.0, "speedup_vs_plain": 1.0},
        {"name": "helix spec adaptive", "tokens_per_second": 120.0, "speedup_vs_plain": 1.2,
         "speedup_vs_hf_assisted": 1.3, "measured_over_predicted": 0.9},
        {"name": "hf generate plain", "tokens_per_second": 125.0},
    ]}], "concurrency": [{"concurrency": 8, "mode": "plain", "speedup_vs_1": 3.5}],
        "memory": {"requests": 8, "models": "target", "peak_paged_over_stored": 1.2}}
    got = {t["target"]: t["result"] for t in evaluate_targets(results)}
    assert got == {"spec_vs_plain": "MISS", "spec_vs_hf_assisted": "PASS", "measured_vs_predicted": "PASS",
                   "plain_vs_hf": "MISS", "concurrency_8": "PASS", "paged_over_stored": "MISS",
                   "adaptive_vs_plain": "PASS"}
    results["scenarios"][0]["methods"] += [
        {"name": "helix spec K=2", "backend": "helix", "k": 2, "tokens_per_second": 110.0},
        {"name": "helix spec K=4", "backend": "helix", "k": 4, "tokens_per_second": 130.0}]
    results["concurrency"].append({"concurrency": 8, "mode": "speculative", "speedup_vs_1": 3.0,
                                   "tokens_per_second": 300.0, "temperature": 0.0})
    results["concurrency"][0]["tokens_per_second"] = 320.0
    checks = [(t["target"], t["where"], t["result"]) for t in evaluate_targets(results) if "adaptive" in t["target"]]
    assert checks == [("adaptive_vs_best_k", "T=0, 128 tokens, batch 1, best K=4", "MISS"),  # 120 / 130
                      ("adaptive_vs_plain", "T=0, 128 tokens, batch 1", "PASS"),
                      ("adaptive_vs_plain", "T=0, 8 concurrent", "MISS")]  # 300 / 320


def test_never_slower_targets_pair_the_rounds():
    """adaptive (and n-gram) over plain is the median of the ratios within a round or repeat, where both ran back to
    back: a slow minute that hit plain in one round and adaptive in another moves the ratio of medians, not this;
    a real gap stays."""
    plain = {"name": "helix plain", "tokens_per_second": 100.0, "tokens_per_second_runs": [100.0, 80.0, 120.0]}
    adaptive = {"name": "helix spec adaptive", "tokens_per_second": 90.0, "tokens_per_second_runs": [90.0, 80.0, 121.0],
                "speedup_vs_plain": 0.9, "speedup_vs_hf_assisted": None, "measured_over_predicted": None}
    conc = [{"concurrency": 8, "mode": "plain", "speedup_vs_1": 4.0, "tokens_per_second": 400.0},
            {"concurrency": 8, "mode": "speculative", "speedup_vs_1": 4.0, "tokens_per_second": 360.0,
             "temperature": 0.0, "vs_plain_paired": 0.995}]
    results = {"scenarios": [{"temperature": 0.0, "max_new_tokens": 128, "methods": [plain, adaptive]}],
               "concurrency": conc}
    got = [(t["where"], t["measured"], t["result"]) for t in evaluate_targets(results) if t["target"] == "adaptive_vs_plain"]
    assert got == [("T=0, 128 tokens, batch 1, paired by round (ratio of medians 0.900)", 1.0, "PASS"),
                   ("T=0, 8 concurrent, paired by repeat (ratio of medians 0.900)", 0.995, "PASS")]
    adaptive["tokens_per_second_runs"] = [90.0, 72.0, 108.0]  # 10% behind in every round
    conc[1]["vs_plain_paired"] = 0.9
    assert [t["measured"] for t in evaluate_targets(results) if t["target"] == "adaptive_vs_plain"] == [0.9, 0.9]


def test_adaptive_at_8_concurrent_is_compared_with_the_best_fixed_k_there():
    """Issue 14's batch 8: the concurrency section's fixed-K rows at 8 concurrent against adaptive there, paired by
    repeat with the K chosen on the other repeats; a K that wins everywhere makes adaptive miss."""
    conc = [{"concurrency": 8, "mode": "plain", "speedup_vs_1": 4.0, "tokens_per_second": 400.0},
            {"concurrency": 8, "mode": "speculative", "speedup_vs_1": 4.0, "tokens_per_second": 500.0,
             "tokens_per_second_runs": [500.0, 400.0, 600.0], "temperature": 0.0, "vs_plain_paired": 1.2}]
    fixed = [{"concurrency": 8, "mode": "K=2", "k": 2, "tokens_per_second": 480.0,
              "tokens_per_second_runs": [480.0, 410.0, 560.0]},
             {"concurrency": 8, "mode": "K=4", "k": 4, "tokens_per_second": 470.0,
              "tokens_per_second_runs": [470.0, 380.0, 590.0]}]
    results = {"scenarios": [], "concurrency": conc, "concurrency_fixed_k": fixed}

    def got():
        return [(t["where"], t["measured"], t["result"]) for t in evaluate_targets(results)
                if t["target"] == "adaptive_vs_best_k"]

    assert got() == [("T=0, 8 concurrent, K chosen on the other repeats (max of medians: K=2, 1.042)",
                      round(statistics.median([500 / 480, 400 / 380, 600 / 560]), 3), "PASS")]
    fixed[1]["tokens_per_second_runs"] = [560.0, 450.0, 680.0]  # K = 4 beats adaptive in every repeat
    fixed[1]["tokens_per_second"] = 560.0
    assert got()[0][2] == "MISS"


def test_sampled_rows_at_8_concurrent_are_checked_against_plain_and_the_best_fixed_k():
    """Issue 14 at T = 0.8 and batch 8: the sampled rows (``concurrency_sampled``) give both checks, paired by repeat;
    a K that beats adaptive in every repeat makes it miss."""
    sampled = [{"temperature": 0.8, "concurrency": 8, "mode": "plain", "k": None, "tokens_per_second": 400.0,
                "tokens_per_second_runs": [400.0, 380.0, 420.0]},
               {"temperature": 0.8, "concurrency": 8, "mode": "speculative", "k": None, "tokens_per_second": 440.0,
                "tokens_per_second_runs": [440.0, 400.0, 460.0], "vs_plain_paired": 1.1},
               {"temperature": 0.8, "concurrency": 8, "mode": "K=2", "k": 2, "tokens_per_second": 430.0,
                "tokens_per_second_runs": [430.0, 410.0, 450.0]}]
    results = {"scenarios": [], "concurrency_sampled": sampled}
    got = {t["target"]: (t["where"], t["measured"], t["result"]) for t in evaluate_targets(results)}
    assert got == {"adaptive_vs_best_k": ("T=0.8, 8 concurrent, best K=2", round(440 / 430, 3), "PASS"),
                   "adaptive_vs_plain": ("T=0.8, 8 concurrent, paired by repeat (ratio of medians 1.100)", 1.1, "PASS")}
    sampled.append({"temperature": 0.8, "concurrency": 8, "mode": "K=4", "k": 4, "tokens_per_second": 500.0,
                    "tokens_per_second_runs": [500.0, 470.0, 520.0]})
    got = {t["target"]: t for t in evaluate_targets(results)}
    assert got["adaptive_vs_best_k"]["result"] == "MISS" and "K=4" in got["adaptive_vs_best_k"]["where"]


def test_adaptive_vs_best_fixed_k_chooses_k_on_the_other_rounds():
    """The best fixed K is chosen without the round it is compared in, and compared in that round: a K whose median
    noise lifted above the others' does not set the bar, and a real gap stays."""
    from engine.bench.report import adaptive_vs_best_fixed

    k4 = {"k": 4, "tokens_per_second_runs": [100.0, 100.0, 100.0]}
    k6 = {"k": 6, "tokens_per_second_runs": [104.0, 104.0, 90.0]}  # median 104, mean 99.3: no better than K=4
    adaptive = {"tokens_per_second_runs": [100.0, 100.0, 100.0]}
    assert 100.0 / 104.0 < 0.97  # the ratio of medians: a MISS by noise
    assert adaptive_vs_best_fixed(adaptive, [k4, k6]) == 1.0
    slower = {"tokens_per_second_runs": [90.0, 90.0, 90.0]}
    assert abs(adaptive_vs_best_fixed(slower, [k4, k6]) - 0.9) < 1e-9  # a real 10% gap stays 10%
    assert adaptive_vs_best_fixed({"tokens_per_second_runs": [100.0]}, [k4]) is None  # one round: no pairing


def test_each_round_samples_new_texts_that_every_method_of_the_round_shares():
    """At T > 0 a round's seeds are the same for every method (seeded sampling is drafter-invariant, so plain, fixed
    K and adaptive sample one text) and new in the next round: the rounds measure speed over samples, not one draw."""
    from engine.bench import suite
    from engine.bench.runs import Method

    engine = tiny_engine()
    prompts = [engine.tokenizer(p)["input_ids"] for p in load_prompts()[:2]]
    methods = (Method("helix plain", "helix"), Method("helix spec K=2", "helix", True, 2),
               Method("helix spec adaptive", "helix", True, None))
    tracked = [suite._Tracked(m, inst=Instrument(engine)) for m in methods]
    cfg = suite.BenchConfig(warmup_runs=1)
    rounds = suite._run_rounds(engine, prompts, tracked, 1.0, 12, cfg, {}, suite._Progress(0, False), rounds=2)
    texts = [[r[id(t)].outputs for t in tracked] for r in rounds]
    for per_method in texts:
        assert per_method[0] == per_method[1] == per_method[2]
    assert texts[0][0] != texts[1][0]
    assert engine.target.blocks.num_free == engine.target.blocks.num_blocks


def test_timed_passes_synchronise_nothing_and_the_cost_model_times_a_pass_of_its_own():
    """A timed forward synchronises the device (on CUDA), and the host work a step overlaps with its verification
    (adaptive K's decisions, deferred bookkeeping) then waits on it: the rounds' passes count drafts only, with no
    forward shadowed, and the cost model's forward times come from one pass of their own that counts for no speed."""
    from engine.bench import suite
    from engine.bench.runs import Method

    engine = tiny_engine()
    prompts = [engine.tokenizer(p)["input_ids"] for p in load_prompts()[:2]]
    methods = (Method("helix plain", "helix"), Method("helix spec K=2", "helix", True, 2))
    tracked = [suite._Tracked(m, inst=Instrument(engine, forwards=False), cost=Instrument(engine)) for m in methods]
    with tracked[1].inst:
        assert not {"forward", "draft_chain"} & (set(vars(engine.target)) | set(vars(engine.draft)))
    cfg = suite.BenchConfig(warmup_runs=1, repeats=1)
    prog = suite._Progress(0, False)
    suite._run_rounds(engine, prompts, tracked, 0.0, 12, cfg, {}, prog, rounds=1)
    spec = tracked[1]
    assert spec.inst.drafts and not spec.inst.forwards.times and not spec.cost.forwards.times
    assert suite._cost_model(tracked)["by_method"] == {}  # nothing timed yet: no prediction
    suite._run_rounds(engine, prompts[:1], tracked, 0.0, 12, cfg, {}, prog, rounds=1, record=False, costs=True)
    assert [len(t.passes) for t in tracked] == [1, 1]  # the cost pass is no timed pass
    assert spec.cost.forwards.select("draft") and tracked[0].cost.forwards.select("target", tokens=1)
    model = suite._cost_model(tracked)["by_method"]["helix spec K=2"]
    assert model["draft_step_ms"] > 0 and model["verify_step_ms"] > 0 and model["predicted_speedup"] > 0
    assert engine.target.blocks.num_free == engine.target.blocks.num_blocks


def test_concurrent_clients_send_their_next_request_when_the_last_finishes():
    """n clients, each sending its next request as its last finishes: every request runs to its end, never more
    than n at once, and the bench's rows say how many requests they timed."""
    from engine.bench.runs import helix_concurrent

    engine = tiny_engine()
    in_flight = []
    res = helix_concurrent(engine, [[5, 6, 7], [8, 9]], 3, True, 0.0, 10, requests=8,
                           on_step=lambda e: in_flight.append(e.num_running + e.num_waiting))
    assert res.tokens == 8 * 10 and max(in_flight) <= 3 and 3 in in_flight
    assert not engine.has_work()


def test_instrument_leaves_the_engine_as_it_found_it():
    engine = tiny_engine()
    originals = {name: getattr(instrument_mod.llm_engine, name) for name in ("decode_step", "top_logprobs")}
    with Instrument(engine, profile=True) as inst:
        engine.generate("Once upon a time", _params(temperature=0.0))
    assert inst.steps > 0 and inst.drafts
    for obj in (engine, engine.target, engine.draft, engine.target.cache, engine.scheduler):
        assert not {"forward", "step", "_decode", "_emit", "update", "admit"} & set(vars(obj))
    for name, fn in originals.items():
        assert getattr(instrument_mod.llm_engine, name) is fn
    assert instrument_mod.model_runner.forward_with_cache.__name__ == "forward_with_cache"


def _params(**kw):
    from engine import SamplingParams

    return SamplingParams(max_new_tokens=12, ignore_eos=True, **kw)


def test_doctor_measures_and_sets_the_adaptive_prior():
    engine = tiny_engine()
    report = diagnose(engine, load_prompts()[:2], temperature=0.0, max_new_tokens=12)
    assert isinstance(report, DoctorReport)
    model = next(m for m in report.methods if m.method == "model")
    assert 0 <= model.alpha <= 1 and model.draft_cost > 0 and report.target_step_ms > 0
    assert report.recommended_method in ("", "auto", "model", "ngram") and report.verdict
    assert report.recommended_k is None or 0 <= report.recommended_k <= 8
    assert model.alpha_per_position and all(0 <= a <= 1 for a in model.alpha_per_position)
    if report.alpha > 0:
        assert engine.alpha_prior == report.alpha
    assert abs(engine.draft_cost - model.draft_cost) < 1e-3


def test_bench_cli_quick_end_to_end(model_dirs, tmp_path, capsys):
    out = tmp_path / "bench.json"
    args = ["bench", "--quick", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
            "--device", "cpu", "--json", str(out), "--no-hf", "--ks", "2", "--concurrency", "1,2"]
    try:
        import matplotlib  # noqa: F401

        args += ["--plot", str(tmp_path / "bench.png")]
    except ImportError:
        pass
    assert main.main(args) == 0
    captured = capsys.readouterr()
    assert "helix spec adaptive" in captured.out and "targets" in captured.out
    data = json.loads(out.read_text())
    assert MACHINE_FIELDS <= set(data["machine"]) and data["targets"] and "command" in data
    if "--plot" in args:
        assert (tmp_path / "bench.png").stat().st_size > 1000
    assert main.main(["bench", "--from-json", str(out), "--markdown"]) == 0
    assert "| helix spec adaptive" in capsys.readouterr().out


def test_bench_cli_draft_random_is_a_useless_draft(model_dirs, tmp_path):
    out = tmp_path / "useless.json"
    assert main.main(["bench", "--quick", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
                      "--device", "cpu", "--json", str(out), "--no-hf", "--ks", "2,3", "--concurrency", "1,8",
                      "--temperatures", "0,0.8", "--draft-random"]) == 0
    data = json.loads(out.read_text())
    assert data["machine"]["draft"].endswith("(random weights)")
    assert {t["target"] for t in data["targets"]} >= {"adaptive_vs_plain"}
    # issue 14 at batch 8 too: every fixed K of the sweep ran at 8 concurrent beside adaptive, and is compared
    assert [(r["concurrency"], r["k"]) for r in data["concurrency_fixed_k"]] == [(8, 2), (8, 3)]
    assert any(t["target"] == "adaptive_vs_best_k" and t["where"].startswith("T=0, 8 concurrent")
               for t in data["targets"])
    # ... and sampled: plain, adaptive and every K at 8 concurrent, T = 0.8, each checked
    sampled = data["concurrency_sampled"]
    assert [(r["temperature"], r["concurrency"], r["mode"]) for r in sampled] == [
        (0.8, 8, "plain"), (0.8, 8, "speculative"), (0.8, 8, "K=2"), (0.8, 8, "K=3")]
    assert all(r["tokens_per_second"] > 0 and r["requests"] == 8 for r in sampled)
    assert {t["target"] for t in data["targets"] if t["where"].startswith("T=0.8, 8 concurrent")} == {
        "adaptive_vs_best_k", "adaptive_vs_plain"}
    assert "sampled, temperature 0.8, 8 concurrent" in format_results(data, markdown=True)
    k2 = next(m for m in data["scenarios"][0]["methods"] if m["name"] == "helix spec K=2")
    assert k2["acceptance_rate"] is not None and k2["acceptance_rate"] < 0.5


def test_repeat_prompt_set_drives_ngram_drafting(model_dirs, tmp_path):
    from engine.bench.prompts import repeat_prompts
    from engine.bench.runs import supports_draft_method

    p = repeat_prompts(["One day a cat sat. It was big.", "Tom ran.", "The sun shone."])
    assert p == ["One day a cat sat. It was big. Tom ran. The sun shone.\n\nOne day a cat sat."]
    out = tmp_path / "repeat.json"
    assert main.main(["bench", "--quick", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
                      "--device", "cpu", "--json", str(out), "--no-hf", "--ks", "2", "--concurrency", "1",
                      "--temperatures", "0", "--prompt-set", "repeat"]) == 0
    data = json.loads(out.read_text())
    assert data["prompt_set"] == "repeat" and data["prompts"][0].count("\n\n") == 1
    if not supports_draft_method():
        pytest.skip("this engine's SamplingParams has no draft_method yet")
    scen = data["scenarios"][0]
    assert "helix spec ngram" in {m["name"] for m in scen["methods"]}
    assert scen["checks"]["speculative_greedy_equals_plain"]  # n-gram drafts are verified like any other
    assert "ngram_vs_plain_repeat" in {t["target"] for t in data["targets"]}


def test_doctor_cli_recommends_k(model_dirs, capsys):
    rc = main.main(["doctor", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "draft"),
                    "--device", "cpu", "--prompts", "2", "--max-new-tokens", "8"])
    out = capsys.readouterr()
    assert rc == 0
    assert "tokenizers: compatible" in out.err
    assert "recommended method and K" in out.out and "per position" in out.out


def test_doctor_rejects_an_incompatible_pair_with_exit_code_2(model_dirs, capsys):
    rc = main.main(["doctor", "--target", str(model_dirs / "target"), "--draft", str(model_dirs / "other"),
                    "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "tokenizers are incompatible" in err and "vocabulary size" in err and "Traceback" not in err


@pytest.mark.parametrize("args, message", [
    (["bench", "--ks", "9"], "--ks must be in 1..8"),
    (["bench", "--repeats", "0"], "--repeats must be >= 1"),
    (["bench", "--waves", "0"], "--waves must be >= 1"),
    (["bench", "--concurrency-repeats", "0"], "--concurrency-repeats must be >= 1"),
    (["bench", "--no-draft"], "needs a draft model"),
    (["doctor", "--methods", "medusa"], "--methods takes model, ngram and eagle"),
])
def test_bench_and_doctor_usage_errors_exit_2(args, message, capsys):
    assert main.main(args) == 2
    assert message in capsys.readouterr().err


def test_shape_bench_quick_cli_end_to_end(tmp_path, capsys):
    """``bench --shape tiny --quick`` on the CPU: calibrated acceptance levels, Helix and HF rows,
    % of the bandwidth limit, issue 15/14 targets, JSON plus a Markdown copy."""
    import torch

    torch.set_num_threads(1)
    out = tmp_path / "shapes.json"
    assert main.main(["bench", "--shape", "tiny", "--quick", "--threads", "1", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "targets (issues 15 and 14)" in text and "hf generate static cache" in text
    r = json.loads(out.read_text())
    assert r["copy_bandwidth_bytes_per_s"] > 0 and "error" not in r
    (s,) = r["shapes"]
    assert s["levels"]["0.0"]["eps"] == 1.0 and s["levels"]["0.8"]["eps"] < 1.0
    # a smaller epsilon makes the truncated draft agree more: that is the knob
    assert s["levels"]["0.8"]["calibrated_acceptance"] > s["levels"]["0.0"]["calibrated_acceptance"]
    for part in s["prompts"].values():
        methods = {(row["method"], row["batch"]) for row in part["rows"]}
        assert {("helix plain", 1), ("helix plain", 4), ("helix adaptive", 4), ("hf generate eager", 1),
                ("hf generate static cache", 1), ("hf assisted default", 1)} <= methods
        assert all(row["tokens_per_second"] > 0 and row["pct_of_bandwidth_limit"] > 0 for row in part["rows"])
    keys = {t["target"] for t in r["targets"]}
    assert {"plain_vs_hf_static", "concurrency", "adaptive_vs_best_k", "adaptive_vs_plain"} <= keys
    assert "| helix plain |" in (tmp_path / "shapes.md").read_text()
    # --from-json re-renders a shape run (its targets evaluated again)
    assert main.main(["bench", "--from-json", str(out), "--markdown"]) == 0
    again = capsys.readouterr().out
    assert "### targets (issues 15 and 14)" in again and "| helix plain |" in again


def test_truncated_draft_shares_the_targets_weights():
    import torch

    from engine.bench import shapes as sh

    target = sh.build_target(sh.SHAPES["tiny"], torch.device("cpu"), torch.float32)
    draft = sh.truncated_draft(target, 1)
    assert len(draft.model.layers) == 1 and draft.config.num_hidden_layers == 1
    assert draft.model.layers[0].self_attn.q_proj.weight is target.model.layers[0].self_attn.q_proj.weight
    knob = sh.AcceptanceKnob(target, 1)
    w = target.model.layers[2].mlp.down_proj.weight
    before = w.detach().clone()
    knob.set(0.25)
    assert (w - before * 0.25).abs().max() < 1e-6
    assert sh.weight_bytes(target) < sum(p.numel() * 4 for p in target.parameters()) + 1  # shared counted once


def test_phi_4_mini_shape_runs_on_the_lean_forward():
    """The phi-4-mini shape (its head dim, rotary share and LongRoPE; fewer heads, layers and tokens here) builds a
    Phi-3 model the lean forward runs, with the long table past 4096 positions; its draft and knob work as the
    Llama shapes' do."""
    from dataclasses import replace

    import torch

    from engine.bench import shapes as sh
    from engine.models import lean_model_for

    shape = replace(sh.SHAPES["phi-4-mini"], vocab=512, hidden=256, intermediate=256, layers=3, heads=2, kv_heads=1)
    target = sh.build_target(shape, torch.device("cpu"), torch.float32, max_positions=8192)
    assert type(target).__name__ == "Phi3ForCausalLM"
    lean, why = lean_model_for(target)
    assert why is None and lean.rot_dim == 96 and lean.head_dim == 128 and lean.original_max == 4096
    assert lean.long_inv_freq is not None and not torch.equal(lean.long_inv_freq, lean.inv_freq)
    draft = sh.truncated_draft(target, 1)
    assert draft.model.layers[0].self_attn.qkv_proj.weight is target.model.layers[0].self_attn.qkv_proj.weight
    w = target.model.layers[2].mlp.down_proj.weight
    before = w.detach().clone()
    sh.AcceptanceKnob(target, 1).set(0.5)
    assert (w - before * 0.5).abs().max() < 1e-6


def test_gemma_3_1b_shape_runs_on_the_lean_forward_and_its_knob_reaches_it():
    """The gemma-3-1b shape (one KV head of 256, five sliding layers to a full one, the norms around attention and
    MLP; fewer layers, smaller widths here) builds a Gemma 3 model the lean forward runs; its knob scales the deeper
    layers' output norms (1 + w), and the lean forward's copies of them follow once renewed: its logits then equal
    transformers' again, and the draft (the first layers) is untouched."""
    from dataclasses import replace

    import torch

    from engine.bench import shapes as sh
    from engine.block_manager import BlockManager
    from engine.kv_pool import KVPool, KVShape
    from engine.model_runner import ModelRunner, RowInput

    shape = replace(sh.SHAPES["gemma-3-1b"], vocab=512, hidden=64, intermediate=96, layers=7, head_dim_=32, window=8)
    target = sh.build_target(shape, torch.device("cpu"), torch.float32, max_positions=1024)
    assert type(target).__name__ == "Gemma3ForCausalLM" and target.config.layer_types[5] == "full_attention"
    draft = sh.truncated_draft(target, 2)
    assert draft.config.layer_types == ["sliding_attention"] * 2

    def runner(lean):
        pool = KVPool(32, 16, KVShape.from_config(target.config), torch.float32, torch.device("cpu"))
        return ModelRunner(target, pool, BlockManager(32, 16), 512, lean=lean)

    fast = runner(True)
    assert fast.forward_path == "lean" and fast.lean.window == 8 and fast.lean.local_inv_freq is not None
    knob = sh.AcceptanceKnob(target, 2)
    knob.on_change.append(fast.lean.refresh_copies)
    norm = target.model.layers[3].post_feedforward_layernorm.weight
    before = norm.detach().clone()
    knob.set(0.25)
    assert (1 + norm - 0.25 * (1 + before)).abs().max() < 1e-6
    assert torch.equal(target.model.layers[1].post_feedforward_layernorm.weight, torch.zeros_like(norm))
    rows = [RowInput(0, list(range(3, 40)), 3)]
    got, want = fast.forward(rows)[0], runner(False).forward(rows)[0]
    assert (got - want).abs().max() < 1e-4


@pytest.mark.parametrize("args,message", [
    (["--shape", "gpt-9"], "unknown shape 'gpt-9'"),
    (["--shape", "tiny", "--draft-layers", "9"], "--draft-layers must be in 1..3"),
    (["--shape", "tiny", "--device", "mps"], "--shape runs on cpu or cuda"),
])
def test_shape_bench_usage_errors_exit_2(args, message, capsys):
    assert main.main(["bench", *args]) == 2
    assert message in capsys.readouterr().err


def test_the_shape_bench_interleaves_what_a_target_compares():
    """Every configuration runs one pass per round, the order rotated each round; each reports its median pass and
    keeps every pass (the adaptive checks pair them by round)."""
    from engine.bench.runs import PassResult
    from engine.bench.shape_bench import interleaved

    order, warmed = [], []

    def config(label, speeds):
        it = iter(speeds)

        def run():
            order.append(label)
            return PassResult(tokens=int(next(it)), seconds=1.0)
        return label, run, lambda: warmed.append(label)

    got = interleaved([config("a", [10, 30, 20]), config("b", [5, 6, 7]), config("c", [1, 3, 2])], 3)
    assert warmed == ["a", "b", "c"]
    assert order == ["a", "b", "c", "b", "c", "a", "c", "a", "b"]
    assert got["a"].tokens_per_second == 20 and got["a"].passes == [10, 30, 20]
    assert got["b"].tokens_per_second == 6 and got["c"].passes == [1, 3, 2]


def test_shape_targets_pair_adaptive_by_round():
    """With passes kept, adaptive's checks are the median of per-round ratios (best fixed K chosen on the other
    rounds), as on the CPU bench; a slow round shared by both sides then cancels. Without passes: medians."""
    from engine.bench.shape_report import shape_targets

    def row(method, k, passes, batch=1, level=0.5):
        return {"method": method, "batch": batch, "acceptance_level": level, "k": k, "tokens_per_second_runs": passes,
                "tokens_per_second": sorted(passes)[len(passes) // 2]}

    # rounds 2 and 3 ran slow for everything; adaptive is 2% ahead of K = 4 and of plain in every round
    rows = [row("helix plain", None, [100, 80, 80]), row("helix K=4", 4, [200, 160, 160]),
            row("helix K=2", 2, [150, 120, 120]), row("helix adaptive", None, [204, 163.2, 163.2])]
    res = {"shapes": [{"shape": "x", "prompts": {"32": {"rows": rows}}}]}
    got = {t["target"]: t for t in shape_targets(res)}
    assert got["adaptive_vs_best_k"]["measured"] == 1.02 and "paired by round" in got["adaptive_vs_best_k"]["what"]
    assert got["adaptive_vs_plain"]["measured"] == 2.04
    for r in rows:
        r["tokens_per_second_runs"] = None
    got = {t["target"]: t for t in shape_targets(res)}
    assert got["adaptive_vs_best_k"]["measured"] == round(163.2 / 160, 3)
    assert "paired" not in got["adaptive_vs_best_k"]["what"]


def test_shape_targets_keep_gpu_speed_bars_off_a_cpu_run():
    """Issue 15's absolute bars (tok/s against the H200's before graphs) apply to a GPU run only; a CPU run of the
    same shape keeps the ratio checks."""
    from engine.bench.shape_report import shape_targets

    rows = [{"method": "helix plain", "batch": 1, "acceptance_level": 0.5, "k": None, "tokens_per_second": 5.0,
             "tokens_per_second_runs": None},
            {"method": "helix K=4", "batch": 1, "acceptance_level": 0.5, "k": 4, "tokens_per_second": 12.0,
             "tokens_per_second_runs": None},
            {"method": "helix adaptive", "batch": 1, "acceptance_level": 0.5, "k": None, "tokens_per_second": 11.9,
             "tokens_per_second_runs": None}]

    def targets(kind):
        shape = {"shape": "tinyllama-1.1b", "device_kind": kind, "prompts": {"32": {"rows": rows}}}
        return {t["target"] for t in shape_targets({"shapes": [shape]})}

    assert "x5_today_1b" in targets("cuda") and "adaptive_vs_best_k" in targets("cuda")
    assert "x5_today_1b" not in targets("cpu") and {"adaptive_vs_best_k", "adaptive_vs_plain"} <= targets("cpu")


def test_the_emulation_charges_each_decode_step_its_plans_device_time_and_restores_the_engine():
    """``engine.bench.emulate``: the real engine drafts and decides, a virtual clock charges each decode step what its
    plan costs on the emulated device. Without noise, plain decoding runs at one token per target step (the prefill's
    token is free there), a fixed K drafts K, and the engine module is left as it was."""
    import torch

    from engine import llm_engine
    from engine.bench.emulate import DeviceCosts, emulate

    before, threads = (llm_engine.decode_step, llm_engine.time), torch.get_num_threads()
    costs = DeviceCosts(target_ms=1.0)
    out = emulate(["plain", "k2"], rounds=1, prompts=1, tokens=17, costs=costs, noise=0.0)
    assert abs(out["rates"]["plain"][0] - 17 / 16) < 1e-9  # 16 decode steps of 1 ms for 17 tokens
    assert out["mix"]["plain"] == {"0": 1.0}
    assert out["mix"]["k2"].get("m2", 0) > 0.7
    assert 17 / (16 * costs.step_ms("model", 2)) < out["rates"]["k2"][0] < 17 / 6  # at most 3 tokens a step
    k2 = out["rates"]["k2"]
    assert (llm_engine.decode_step, llm_engine.time) == before and torch.get_num_threads() == threads
    # a seed repeats a run: the adaptive decisions read only the virtual clock and the device's cost ratios (the
    # forwards' real timings once moved n-gram's position costs and the decisions with them)
    runs = [emulate(["default"], rounds=1, prompts=1, tokens=40, costs=costs, noise=0.03, seed=3) for _ in range(2)]
    assert runs[0] == runs[1]
    ratios = runs[0]["ratios"]
    assert ratios["draft"] == costs.draft_ms / costs.target_ms and ratios["verify"] == costs.verify_ms / costs.target_ms
    assert abs(ratios["first"] - ratios["verify"]) < 1e-9
    # a constant of n-gram's set for a run (the repeat prompts: its continuations repeat the prompt) and put back
    from engine.proposers import ngram
    weight = ngram.ORDER_PRIOR_WEIGHT
    out = emulate(["plain"], rounds=1, prompts=1, tokens=5, costs=costs, noise=0.0, prompt_set="repeat",
                  constants={"ORDER_PRIOR_WEIGHT": weight + 1})
    assert out["mix"]["plain"] == {"0": 1.0} and ngram.ORDER_PRIOR_WEIGHT == weight
    # a device's measured step times per K in place of the linear model (the draft model's; past them, linear)
    shaped = DeviceCosts(target_ms=1.0, model_ms=(1.5, 1.6))
    assert shaped.step_ms("model", 2) == 1.6 and shaped.step_ms("model", 3) == costs.step_ms("model", 3)
    assert shaped.step_ms("eagle", 1) == costs.step_ms("eagle", 1) and shaped.step_ms("", 0) == 1.0
    # the machine's phases, a random stream of their own: a slow phase adds phase_ms to a drafting step (a share of it
    # to a plain one); a seed repeats them, and without phase_steps there are none
    slow = DeviceCosts(target_ms=1.0, phase_ms=0.5)
    phased = [emulate(["k2"], rounds=1, prompts=1, tokens=17, costs=slow, noise=0.0, phase_steps=2) for _ in range(2)]
    assert phased[0] == phased[1] and phased[0]["rates"]["k2"][0] < k2[0]
    assert abs(phased[0]["clean_rates"]["k2"][0] - k2[0]) < 1e-9  # the same steps at the device's costs alone
    assert abs(emulate(["k2"], rounds=1, prompts=1, tokens=17, costs=slow, noise=0.0)["rates"]["k2"][0] - k2[0]) < 1e-9
    # the bench's order (each prompt through every mode in turn): each mode is charged its own requests' steps, so
    # without noise a fixed mode's rate does not depend on the order
    passes, bench = (emulate(["plain", "k2"], rounds=1, prompts=2, tokens=17, costs=costs, noise=0.0, order=order)
                     for order in ("passes", "bench"))
    assert all(abs(passes["rates"][m][0] - bench["rates"][m][0]) < 1e-9 for m in ("plain", "k2")), (passes, bench)
    with pytest.raises(ValueError, match="order"):
        emulate(["plain"], rounds=1, prompts=1, tokens=5, order="interleaved")
    # a shape with random weights and its truncated self-draft in place of the demo pair (the shape bench's pair): the
    # same clock, its random prompts; a fixed K's tokens a step rise as eps shrinks (the draft follows the target)
    k4 = [emulate(["k4"], rounds=1, prompts=1, tokens=30, costs=costs, noise=0.0, shape="tiny", eps=eps)
          for eps in (1.0, 0.01)]
    assert k4[0]["mix"]["k4"].get("m4", 0) > 0.7 and k4[1]["rates"]["k4"][0] > 1.5 * k4[0]["rates"]["k4"][0], k4
    with pytest.raises(ValueError, match="shape"):
        emulate(["plain"], rounds=1, prompts=1, tokens=5, shape="no-such-shape")
    with pytest.raises(ValueError, match="prompt_set"):  # the repeat set is the demo pair's text
        emulate(["plain"], rounds=1, prompts=1, tokens=5, shape="tiny", prompt_set="repeat")
    assert torch.get_num_threads() == threads  # the shape's two threads put back too


def test_the_greedy_replay_counts_the_engines_own_decode_steps_for_every_fixed_k():
    """``engine.bench.replay``: one plain greedy run and one forward of the draft over it say where every draft stops,
    so a fixed K replayed over the text takes exactly the decode steps the engine takes with that K (the demo pair,
    greedy, batch 1); the best pair of K by where a step starts is at least the best fixed K, and the bound at least
    that."""
    from engine.bench.replay import greedy_misses, replay, summary
    from engine.config import EngineConfig, SamplingParams
    from engine.factory import build_engine

    engine = build_engine(EngineConfig(device="cpu", dtype="float32"))
    text = load_prompts()[0]
    misses = greedy_misses(engine, [text], 40)
    assert len(misses[0]) == 40 and 0 < sum(misses[0]) < 40  # the draft follows the text in part
    steps = [0]
    decode = engine._decode

    def counted(reqs):
        steps[0] += 1
        decode(reqs)

    engine._decode = counted
    for k in (1, 3, 6, 8):
        steps[0] = 0
        final = engine.generate(text, SamplingParams(max_new_tokens=40, temperature=0.0, num_draft_tokens=k,
                                                     draft_method="model", ignore_eos=True))
        assert len(final.token_ids) == 40
        assert sum(replay(misses[0], lambda p, full, k=k: k).values()) == steps[0], k
    out = summary(misses, [1.0] + [1.0 + 0.1 * k for k in range(1, 9)])
    best = out["fixed"][out["best_k"]]
    assert out["fixed"][0] == 1.0 and best > 1.0  # plain: one token a 1 ms step
    assert out["pair_rate"] >= best - 1e-12 and out["knows_the_run"] >= out["pair_rate"] - 1e-12


def test_a_concurrency_pass_counts_its_drafts_by_proposer():
    """A concurrency pass's drafts by proposer (the bench's per-repeat record, ``drafts_by_method_runs``) are its
    requests' own counts: a fixed-K pass drafts with the draft model alone, as many drafts as its requests made, and
    a pass merged into another adds them up."""
    from engine.bench.runs import helix_concurrent

    engine = tiny_engine()
    prompts = [engine.tokenizer(p)["input_ids"] for p in load_prompts()[:2]]
    fixed = helix_concurrent(engine, prompts, 2, True, 0.0, 12, 0, k=2, requests=4, draft_method="model")
    assert fixed.num_drafts > 0 and fixed.drafts_by_method == {"model": fixed.num_drafts}
    assert fixed.graph_captures == 0
    plain = helix_concurrent(engine, prompts, 2, False, 0.0, 12, 0, requests=2)
    assert plain.drafts_by_method == {}
    plain.merge(fixed)
    plain.merge(fixed)
    assert plain.drafts_by_method == {"model": 2 * fixed.num_drafts}
    assert engine.target.blocks.num_free == engine.target.blocks.num_blocks
