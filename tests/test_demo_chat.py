"""The demo pair as a chat model: its chat format, the engine stopping on every eos id of a list, a reply that
ends its turn, and the app opening on Chat for it."""

from __future__ import annotations

import json
import sys

import pytest

from engine.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig, SamplingParams
from tests.tiny import tiny_engine

MODELS = DEMO_TARGET.parent
if str(MODELS) not in sys.path:
    sys.path.insert(0, str(MODELS))

needs_demo = pytest.mark.skipif(not (DEMO_TARGET / "model.safetensors").is_file(), reason="demo pair not present")
CONVERSATION = [("system", "You are a friendly storyteller."), ("user", "Write a story about a dog named Max."),
                ("assistant", "Max was a big dog. He liked to run."), ("user", "Tell that story again.")]


@pytest.fixture(scope="module")
def demo_engine():
    from engine.factory import build_engine

    return build_engine(EngineConfig(target=str(DEMO_TARGET), draft=str(DEMO_DRAFT), device="cpu",
                                     kv_cache_tokens=4096), warmup=False)


def _tiny_engine_with_eos(eos_ids: list[int]):
    """tests.tiny's pair, its target's generation_config listing ``eos_ids`` (as the demo pair's lists two)."""
    from engine import LLMEngine
    from tests.tiny import tiny_llama, tiny_tokenizer

    tok = tiny_tokenizer()
    target, draft = tiny_llama(len(tok), layers=2, seed=0), tiny_llama(len(tok), layers=1, seed=1)
    target.generation_config.eos_token_id = eos_ids
    config = EngineConfig(target="tiny-target", draft="tiny-draft", kv_cache_tokens=4096)
    return LLMEngine(target, tok, draft, config, max_context=256, names=("tiny-target", "tiny-draft"))


def test_the_engine_stops_on_every_eos_id_of_a_list():
    greedy = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    free = _tiny_engine_with_eos([0]).generate("Once upon a time", greedy).token_ids
    assert free == tiny_engine().generate("Once upon a time", greedy).token_ids  # the same models as tests.tiny
    checked = 0
    for pos in (2, 5):  # a token the model writes there (and not before) becomes the second eos id
        stop = free[pos]
        if stop in free[:pos] or stop == 0:
            continue
        checked += 1
        for k in (None, 4):  # plain and speculative
            engine = _tiny_engine_with_eos([0, stop])
            ev = engine.generate("Once upon a time", SamplingParams(max_new_tokens=12, temperature=0.0,
                                                                    speculative=k is not None, num_draft_tokens=k))
            assert ev.finish_reason == "eos" and ev.token_ids == free[: pos + 1], (pos, k)
    assert checked


@needs_demo
def test_demo_pair_ships_a_chat_template_and_end_of_turn_eos():
    from training.chat_format import encode_conversations
    from training.config import END_ID, EOS_ID
    from transformers import AutoTokenizer

    from engine.server.chat import chat_prompt

    for folder in (DEMO_TARGET, DEMO_DRAFT):
        assert json.loads((folder / "generation_config.json").read_text())["eos_token_id"] == [END_ID, EOS_ID]
        assert "chat_template" in json.loads((folder / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(DEMO_TARGET)
    assert tok.convert_ids_to_tokens([END_ID, EOS_ID]) == ["<|end|>", "<|endoftext|>"]
    ids = chat_prompt(tok, CONVERSATION)  # what the app and the server send
    messages = [{"role": r, "content": t} for r, t in CONVERSATION]
    assert ids == encode_conversations(tok, [messages], add_generation_prompt=True)[0][0]  # what training saw
    assert tok.decode(ids).endswith("Tell that story again.<|end|>\n<|assistant|>\n")


@needs_demo
def test_demo_chat_reply_follows_the_request_and_ends_its_turn(demo_engine):
    from engine.server.chat import chat_prompt

    assert {0, 6} <= demo_engine.eos_ids
    prompt = chat_prompt(demo_engine.tokenizer, [("user", "Write a short story about a dog named Max.")])
    ev = demo_engine.generate(prompt, SamplingParams(max_new_tokens=400, temperature=0.0, num_draft_tokens=4,
                                                     draft_method="model"))
    assert ev.finish_reason == "eos" and ev.token_ids[-1] == 6  # ended its turn with <|end|>
    assert "Max" in ev.text and "<|" not in ev.text
    assert ev.stats.acceptance_rate > 0.5


@needs_demo
def test_the_app_opens_on_chat_for_the_demo_pair(qtbot, tmp_path, demo_engine):
    pytest.importorskip("PySide6")
    from engine.host import EngineHost
    from helix_desktop.app import create_window
    from helix_desktop.settings import AppSettings

    host = EngineHost()
    host.adopt(demo_engine)
    window = create_window(host, AppSettings(tmp_path / "settings"))
    window.show()
    try:
        assert window.tabs.indexOf(window.chat_tab) == 0 and window.tabs.currentWidget() is window.chat_tab
    finally:
        window.close()
