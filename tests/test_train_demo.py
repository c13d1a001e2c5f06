"""The demo pair's training pipeline (resources/models/training, entry point train_demo.py).

The slow tests run the whole pipeline on a tiny config on CPU (tokenizer, chat data, target, distillation
data, draft, saved folders, the evaluation through the engine) and check what it wrote. The fast ones check
the pieces: openings, the instruction data, and that the Python chat format equals the Jinja template.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "resources" / "models"
SCRIPT = MODELS / "train_demo.py"
CORPUS = REPO.parent / "shared" / "data" / "corpus"
if str(MODELS) not in sys.path:
    sys.path.insert(0, str(MODELS))

from training import config as C  # noqa: E402
from training.copy_data import SentencePool, copy_conversation, copy_sequences, told_twice  # noqa: E402
from training.corpus import eval_story_indices, opening, sentences  # noqa: E402
from training.instruct import TASKS, StoryFacts, build_conversations, story_conversation  # noqa: E402

needs_corpus = pytest.mark.skipif(not (CORPUS / "tinystories_valid.txt").exists(), reason=f"demo corpus not found at {CORPUS}")
STORY = ('Once upon a time, there was a little girl named Lily. She had a red ball.\n'
         'One day, Lily took the ball to the park. "Look!" she said. The ball went up into a tree.\n'
         'Her dad came and got the ball down. Lily was happy. She played with the ball all day.')
OTHER = "Tom had a big dog. The dog liked to run in the park. Tom and the dog ran and ran."


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    from training.cli import main

    out = tmp_path_factory.mktemp("demo")
    t0 = time.time()
    summary = main(["--preset", "tiny", "--corpus", str(CORPUS), "--out", str(out), "--device", "cpu"])
    return out, summary, time.time() - t0


@pytest.mark.slow
@needs_corpus
def test_pipeline_writes_complete_hf_folders_with_the_chat_format(tiny_run):
    out, summary, seconds = tiny_run
    for name in ("demo-target", "demo-draft"):
        d = out / name
        for f in ("config.json", "generation_config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
            assert (d / f).is_file(), f"{name}/{f} missing"
        assert json.loads((d / "generation_config.json").read_text())["eos_token_id"] == [C.END_ID, C.EOS_ID]
        assert "<|assistant|>" in json.loads((d / "tokenizer_config.json").read_text())["chat_template"]
        assert not (d / "chat_template.jinja").exists()  # the template lives in tokenizer_config.json
    tcfg = json.loads((out / "demo-target" / "config.json").read_text())
    dcfg = json.loads((out / "demo-draft" / "config.json").read_text())
    assert tcfg["num_hidden_layers"] > dcfg["num_hidden_layers"]
    assert tcfg["vocab_size"] == dcfg["vocab_size"]
    assert tcfg["tie_word_embeddings"] and dcfg["tie_word_embeddings"]
    res = json.loads((out / "demo_results.json").read_text())
    assert set(res["conversations"]) >= set(TASKS) - {"who"}  # every task made it into the data
    assert res["tokens"]["chat_reply_tokens"] > 0
    assert res["tokens"]["copy_target_tokens"] > 0 and res["tokens"]["valid_copy_passages"] > 0  # tiny has copy data
    assert "copy" in res["target_training"]["best_heldout"]
    for part in ("stories", "chat"):
        acc = res["eval"][part]
        assert 0.0 <= acc["acceptance_rate"] <= 1.0 and acc["num_draft_tokens"] > 0
        assert len(acc["accepted_per_position"]) == acc["k"] == 4
        assert 1.0 <= acc["mean_acceptance_length"] <= 5.0
        assert acc["greedy_equals_plain"] == [True, True]  # speculative greedy == plain greedy in the engine
    assert res["eval"]["target"]["heldout_loss"]["stories"] > 0 and res["eval"]["target"]["heldout_loss"]["chat"] > 0
    assert any(s["task"] == "handwritten" for s in res["eval"]["chat_samples"])
    copy = res["eval"]["target"]["copy_loss"]
    assert copy["passages"] > 0 and copy["first"] > 0 and copy["second"] > 0
    for part in ("repeat_ngram", "repeat_model", "copy_chat_ngram", "copy_chat_model"):
        assert res["eval"][part]["prompts"] > 0, part
    assert res["eval"]["repeat_ngram"]["greedy_equals_plain"] == [True]


@pytest.mark.slow
@needs_corpus
def test_finetune_target_continues_the_saved_target_and_draft(tiny_run, tmp_path):
    import shutil

    from training.cli import main

    out, _, _ = tiny_run
    shutil.copytree(out / "demo-target", tmp_path / "demo-target")
    summary = main(["--preset", "tiny", "--corpus", str(CORPUS), "--out", str(tmp_path), "--device", "cpu",
                    "--finetune-target", "--draft-init", str(out / "demo-draft"), "--skip-eval"])
    tt = summary["target_training"]
    assert tt["finetuned"] and tt["history"][0][0] == 0 and "copy" in tt["history"][0][1]  # losses before, as step 0
    assert (tmp_path / "demo-draft" / "model.safetensors").is_file()
    assert json.loads((tmp_path / "demo-target" / "tokenizer.json").read_text())["model"] == json.loads(
        (out / "demo-target" / "tokenizer.json").read_text())["model"]  # the tokenizer is kept


@pytest.mark.slow
@needs_corpus
def test_saved_folders_load_chat_and_generate(tiny_run):
    import torch
    from safetensors import safe_open
    from training.chat_format import encode_conversations
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out, _, _ = tiny_run
    for name in ("demo-target", "demo-draft"):
        d = out / name
        with safe_open(str(d / "model.safetensors"), "pt") as f:
            assert all(f.get_tensor(k).dtype == torch.float16 for k in f.keys())
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.eos_token == "<|endoftext|>" and tok.bos_token and tok.unk_token and tok.pad_token
        assert tok.model_max_length == json.loads((d / "config.json").read_text())["max_position_embeddings"]
        assert [tok.convert_tokens_to_ids(t) for t in C.SPECIAL_TOKENS] == list(range(len(C.SPECIAL_TOKENS)))
        text = 'Once upon a time, there was a cat.\n"Hi!" said Tom.'
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id
        assert tok.decode(ids, skip_special_tokens=True) == text  # byte-level round trip
        chat = [{"role": "user", "content": "Hi"}]
        rendered = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
        assert rendered == "<|endoftext|><|user|>\nHi<|end|>\n<|assistant|>\n"
        assert tok(rendered, add_special_tokens=False)["input_ids"] == encode_conversations(tok, [chat], True)[0][0]
        model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()
        enc = tok(["Once upon a time", "Tom had a red ball. He"], return_tensors="pt", padding=True)
        with torch.no_grad():
            gen = model.generate(**enc, max_new_tokens=8, do_sample=False)
        prompt_len = enc["input_ids"].shape[1]
        assert gen.shape[0] == 2 and prompt_len < gen.shape[1] <= prompt_len + 8  # shorter only if both hit a stop
        assert torch.equal(gen[:, :prompt_len], enc["input_ids"])


@pytest.mark.slow
@needs_corpus
def test_eval_only_and_the_cpu_timer_reuse_the_saved_folders(tiny_run, tmp_path):
    import torch
    from training.cli import main
    from training.cpu_timing import cpu_step_times
    from training.models import load_pair

    out, _, _ = tiny_run
    res_path = tmp_path / "eval.json"
    summary = main(["--preset", "tiny", "--corpus", str(CORPUS), "--out", str(out), "--eval-only",
                    "--no-ngram-eval", "--results", str(res_path)])
    assert res_path.is_file() and "chat_ngram" not in summary["eval"]
    assert summary["eval"]["stories"]["prompts"] == 3
    _, target, draft = load_pair(out / "demo-target", out / "demo-draft", torch.device("cpu"))
    t = cpu_step_times(target, draft, ctx_len=8, reps=3)
    assert t["target_1_ms"] > 0 and t["draft_1_ms"] > 0 and t["ratio_draft_over_target"] > 0
    assert set(t["draft_depth_variants_1_ms"]) == {"1", "2", "3"}


def test_entry_point_help_names_the_stages():
    r = subprocess.run([sys.executable, str(SCRIPT), "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--reuse-target" in r.stdout and "--chat-weight" in r.stdout
    assert "--finetune-target" in r.stdout and "--copy-weight" in r.stdout


def test_openings_and_sentences():
    story = "Once upon a time, there was a dog. He liked to run. One day he ran far.\nThe end."
    assert opening(story) == "Once upon a time, there was a dog."
    assert opening("Tom ran. He fell. Then he cried.") == "Tom ran. He fell."
    assert sentences('"Hi!" said Tom. "Look at me!" Sue ran.') == ['"Hi!" said Tom.', '"Look at me!"', "Sue ran."]
    assert eval_story_indices(800, 50)[:2] == [8, 24]


def test_story_facts_come_from_the_story():
    f = StoryFacts(STORY, random.Random(0))
    assert f.first == "Once upon a time, there was a little girl named Lily."
    assert f.last == "She played with the ball all day."
    assert f.character == "a little girl named Lily" and (f.noun, f.name) == ("little girl", "Lily")
    assert f.opening + " " + f.rest.split("\n")[0] == STORY.split("\n")[0]
    assert all(w in STORY for w in f.words) and len(f.words) == 3
    assert "Lily" in f.topic or "ball" in f.topic


@pytest.mark.parametrize("task", list(TASKS))
def test_every_task_builds_a_conversation_whose_reply_comes_from_the_text(task):
    made = None
    for seed in range(20):  # some tasks draw phrasings that need a topic or words: try a few seeds
        made = story_conversation(STORY, OTHER, random.Random(seed), task=task)
        if made:
            break
    assert made is not None, task
    name, messages = made
    assert name == task and messages[-1]["role"] == "assistant" and messages[-2]["role"] == "user"
    roles = [m["role"] for m in messages if m["role"] != "system"]
    assert roles == ["user", "assistant"] * (len(roles) // 2)
    reply = messages[-1]["content"]
    if task == "greeting":
        assert reply in STORY or "stor" in reply.lower()
    elif task == "who":
        assert "Lily" in reply
    else:  # copied out of the story, the other story or the conversation
        assert reply in STORY or reply in OTHER, (task, reply)


def test_conversations_mix_tasks_system_prompts_and_multi_turn():
    stories = [STORY, OTHER] * 60
    convs, counts = build_conversations(stories, 2, seed=3)
    assert len(convs) == sum(counts.values()) and len(counts) >= 8
    assert any(c[0]["role"] == "system" for c in convs) and any(c[0]["role"] == "user" for c in convs)
    assert any(len([m for m in c if m["role"] == "user"]) == 2 for c in convs)
    assert build_conversations(stories, 2, seed=3)[0] == convs  # seeded


def _pool():
    books = ["The wind blew over the hill. A bird sang in the old oak tree. The river ran fast and cold.\n"
             "Night came, and the stars came out one by one. The fox went home to his den."]
    return SentencePool([STORY, OTHER] + books)


def test_copy_passages_mix_sentences_of_different_documents():
    pool, rng = _pool(), random.Random(1)
    docs = {d for d, _ in pool.items}
    assert len(docs) == 3
    for _ in range(50):
        sents, noisy = pool.passage(rng)
        assert 2 <= len(sents) <= 8
        if not noisy:
            assert all(any(s == t for _, t in pool.items) for s in sents)


def test_copy_conversations_repeat_text_of_the_conversation():
    pool, rng = _pool(), random.Random(2)
    for _ in range(40):
        msgs = copy_conversation(pool, rng)
        assert msgs[-1]["role"] == "assistant"
        earlier = " ".join(m["content"] for m in msgs[:-1])
        assert msgs[-1]["content"] in earlier  # the reply is copied out of the conversation


class _CharTok:
    """A stand-in tokenizer: one id per character (what the copy masks need, no trained BPE)."""

    class backend_tokenizer:  # noqa: N801
        class _E:
            def __init__(self, ids):
                self.ids = ids

        @classmethod
        def encode_batch(cls, texts, add_special_tokens=False):
            return [cls._E([10 + ord(c) % 200 for c in t]) for t in texts]


def test_told_twice_masks_the_first_and_the_second_telling():
    for ids, first, second in told_twice(_CharTok, [STORY, OTHER], 5, seed=0, max_tokens=600):
        a = [t for t, m in zip(ids, first) if m]
        b = [t for t, m in zip(ids, second) if m]
        assert a and a == b  # the second telling repeats the first exactly; the separator is in neither
        assert len(ids) == len(first) == len(second) and not any(x and y for x, y in zip(first, second))


def test_plain_copy_documents_train_only_the_continuation_of_a_repeat():
    for ids, mask in copy_sequences(_CharTok, [STORY, OTHER, "The sun came up. The birds sang. A cow said moo."], 30,
                                    seed=4, chat_frac=0.0):
        assert ids[0] == ids[-1] == C.EOS_ID and len(ids) == len(mask)
        on = [i for i, m in enumerate(mask) if m]
        if not on:  # a one- or two-word repeat has nothing left to train on
            continue
        assert on == list(range(on[0], on[-1] + 1))  # one span: the repeat after its first words
        span, before = ids[on[0]: on[-1] + 1], ids[1: on[0]]
        assert any(before[i: i + len(span)] == span for i in range(len(before)))  # copied from the first telling
        assert not any(mask[: on[0]])  # nothing before it (first telling, separator, first words) is a target
