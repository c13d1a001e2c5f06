"""Take the README screenshots from the real app (Generate, Chat, Compare, Server, Live charts, KV cache, Models).

Run under a virtual display:  ``xvfb-run -a python -m helix_desktop.screenshots [--only chat,models]``
Uses the demo models when they are installed (else the tiny test models; ``--tiny`` forces
them) and a throw-away settings folder, so your own settings are untouched. The Models view
searches a stand-in hub on loopback that serves the demo pair (tests/hub_stand_in.py), so it
needs no network.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

from helix_desktop.paths import resource_path

logger = logging.getLogger("helix.screenshots")

STORY_PROMPT = "Once upon a time, there was a little girl named Lily. One day"
COMPARE_PROMPT = "Tom and his dog went to the park. They"
KV_PROMPT = ("The sun was bright and the birds sang in the big tree. Lily and Tom went to the park with "
             "their dog to play with a red ball. They ran and ran until they were tired, and then they sat "
             "under the tree to eat apples. Mom came with a big basket of bread and milk, and they all had "
             "a picnic on the green grass while the dog chased a butterfly. ")
OTHER_PROMPTS = ("A different story about a cat and the moon.", "The old man had a small boat.",
                 "Sara liked to paint.")


def wait(seconds: float) -> None:
    from PySide6.QtWidgets import QApplication

    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QApplication.processEvents()
        time.sleep(0.01)


def wait_until(condition, timeout: float = 120.0) -> None:
    from PySide6.QtWidgets import QApplication

    end = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > end:
            raise TimeoutError("the app did not reach the expected state in time")
        QApplication.processEvents()
        time.sleep(0.01)


def build_host(tiny: bool, target: str | None = None, draft: str | None = None):
    from engine.config import DEMO_DRAFT, DEMO_TARGET, EngineConfig
    from engine.host import EngineHost
    from helix_desktop.model_catalog import demo_pair_present

    host = EngineHost()
    if target is not None:
        host.load(EngineConfig(target=target, draft=draft, device="cpu"), wait=True)
        if host.worker is not None:
            return host, "chosen"
        raise SystemExit(f"could not load {target}: {host.last_error}")
    if not tiny and demo_pair_present():
        host.load(EngineConfig(target=str(DEMO_TARGET), draft=str(DEMO_DRAFT), device="cpu"), wait=True)
        if host.worker is not None:
            return host, "demo"
        logger.warning("demo models failed to load (%s); using tiny models", host.last_error)
    root = Path(__file__).resolve().parent.parent
    sys.path.insert(0, str(root))
    from tests.tiny import tiny_engine

    host.adopt(tiny_engine())
    return host, "tiny"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def shoot(window, name: str, out: Path) -> None:
    wait(0.3)
    path = out / f"{name}.png"
    window.grab().save(str(path))
    logger.info("wrote %s", path)


def call_server(url: str) -> None:
    import httpx

    with httpx.Client(timeout=120) as client:
        client.get(f"{url}/health")
        client.post(f"{url}/generate", json={"prompt": STORY_PROMPT, "max_new_tokens": 48, "temperature": 0.7})
        with client.stream("POST", f"{url}/generate/stream",
                           json={"prompt": "Lily found a red ball", "max_new_tokens": 32}) as r:
            for _ in r.iter_lines():
                pass
        client.post(f"{url}/v1/chat/completions", json={
            "model": "helix", "max_tokens": 32, "messages": [{"role": "user", "content": "Tell me about the cat."}]})
        client.post(f"{url}/generate", json={"prompt": "", "max_new_tokens": 8})  # a 422, as real logs have
        client.get(f"{url}/v1/models")


VIEWS = ("generate", "chat", "compare", "server", "charts", "kv-cache", "models")
CHAT_TURNS = ("Tell me a short story about a cat who finds a red ball.", "What did the cat do next?")


def shoot_chat(window, out: Path) -> None:
    """Two turns of a conversation with a system prompt, plus an earlier one in the list."""
    chat = window.chat_tab
    window.tabs.setCurrentWidget(chat)
    chat.form.temperature.setValue(0.7)
    chat.form.seed.setValue(11)
    chat.form.max_new_tokens.setValue(72)
    chat.system_prompt.setPlainText("You are a storyteller for small children.")
    chat.input.setPlainText("Write about a dog and the sea.")
    chat.send()
    wait_until(lambda: chat.request_id is None)
    chat.new_chat()
    for turn in CHAT_TURNS:
        chat.input.setPlainText(turn)
        chat.send()
        wait_until(lambda: chat.request_id is None)
    shoot(window, "chat", out)


def shoot_models(window, out: Path) -> None:
    """The Download panel: curated pairs, a search with drafts marked, and a download in progress."""
    from engine.config import DEMO_DRAFT, DEMO_TARGET

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.hub_stand_in import StandInHub

    with StandInHub({"helix/demo-target": DEMO_TARGET, "helix/demo-draft": DEMO_DRAFT},
                    slow_bytes_per_s=4e6) as server:
        os.environ.update(HF_ENDPOINT=server.url, HF_HUB_OFFLINE="0",
                          HF_HUB_CACHE=tempfile.mkdtemp(prefix="helix-shots-hub-"))
        tab, panel = window.models_tab, window.models_tab.downloads
        window.tabs.setCurrentWidget(tab)
        panel.refresh_mode()
        panel.curated.setCurrentRow(0)
        panel.query.setText("demo")
        panel.run_search()
        wait_until(lambda: not panel.search_job.running and panel.results.count() > 0, timeout=30)
        panel.results.setCurrentRow(0)
        panel.find_drafts()
        wait_until(lambda: not panel.drafts_job.running, timeout=30)
        panel._download_selected("target")
        wait_until(lambda: panel.progress.value() > 400, timeout=60)
        shoot(window, "models-download", out)
        panel.cancel()
        wait_until(lambda: not panel.download_job.running, timeout=30)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default=str(resource_path("screenshots")))
    parser.add_argument("--tiny", action="store_true", help="use the tiny test models even if the demo pair exists")
    parser.add_argument("--size", default="1280x800")
    parser.add_argument("--target", help="a model folder to use instead of the demo pair")
    parser.add_argument("--draft", help="the draft for --target")
    parser.add_argument("--only", default=",".join(VIEWS), help=f"comma-separated views to take, of {', '.join(VIEWS)}")
    args = parser.parse_args(argv)
    only = {v.strip() for v in args.only.split(",") if v.strip()}
    if not only <= set(VIEWS):
        parser.error(f"--only takes views from {', '.join(VIEWS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    os.environ["HELIX_SETTINGS_DIR"] = tempfile.mkdtemp(prefix="helix-shots-")

    from helix_desktop.app import ensure_app
    from helix_desktop.main_window import MainWindow
    from helix_desktop.settings import AppSettings

    ensure_app()
    host, which = build_host(args.tiny, args.target, args.draft)
    window = MainWindow(host, AppSettings())
    width, height = (int(v) for v in args.size.split("x"))
    window.resize(width, height)
    window.show()
    wait(0.5)

    if "chat" in only:
        shoot_chat(window, out)
    if "models" in only:
        shoot_models(window, out)
    if only <= {"chat", "models"}:
        window.close()
        return 0

    gen = window.generate_tab
    gen.prompt.setPlainText(STORY_PROMPT)
    gen.form.temperature.setValue(0.7)
    gen.form.seed.setValue(7)
    gen.form.max_new_tokens.setValue(200 if which == "tiny" else 160)
    if "generate" in only:
        window.tabs.setCurrentWidget(gen)
        gen.run()
        wait_until(lambda: gen.last_final is not None)
        shoot(window, "generate", out)
    if "compare" in only:  # plain against every drafting method, each in turn
        cmp_tab = window.compare_tab
        window.tabs.setCurrentWidget(cmp_tab)
        cmp_tab.prompt.setPlainText(COMPARE_PROMPT)
        cmp_tab.form.temperature.setValue(0.0)
        cmp_tab.form.max_new_tokens.setValue(96)
        cmp_tab.runs.setValue(3)
        every = cmp_tab.side_boxes["b"].findText("This PC, every drafting method in turn")
        if every >= 0:
            cmp_tab.side_boxes["b"].setCurrentIndex(every)
        cmp_tab.run()
        wait_until(lambda: not cmp_tab.session.running, timeout=600)
        shoot(window, "compare", out)
    if "server" in only:
        shoot_server(window, out)
    if "charts" in only:  # after some traffic with each drafting method
        window.tabs.setCurrentWidget(window.charts_tab)
        gen.prompt.setPlainText(STORY_PROMPT + " " + STORY_PROMPT)  # a repeat, so n-gram lookup finds matches
        for i, method in enumerate(m for m in host.engine.info()["draft_methods"] if m != "auto"):
            gen.form.seed.setValue(100 + i)
            gen.form.draft_method.setCurrentIndex(gen.form.draft_method.findData(method))
            gen.run()
            wait_until(lambda: gen.request_id is None)
        wait(1.0)
        shoot(window, "charts", out)
    if "kv-cache" in only:
        shoot_kv(window, host, which, out)
    window.close()
    logger.info("screenshots taken on the %s models", which)
    return 0


def shoot_server(window, out: Path) -> None:
    """Real HTTP requests from another thread while the window runs."""
    srv = window.server_tab
    window.tabs.setCurrentWidget(srv)
    srv.port.setValue(free_port())
    srv.switch.click()
    wait_until(lambda: window.server.running and srv.url.text() != "")
    client = threading.Thread(target=call_server, args=(srv.url.text(),))
    client.start()
    wait_until(lambda: not client.is_alive(), timeout=600)
    wait_until(lambda: srv.log_model.rowCount() >= 6, timeout=30)
    shoot(window, "server", out)


def shoot_kv(window, host, which: str, out: Path) -> None:
    """The KV cache with requests in flight; three share a prompt prefix."""
    from engine.config import SamplingParams

    window.tabs.setCurrentWidget(window.kv_tab)
    engine = host.engine
    if which == "tiny":  # tiny models finish in milliseconds: slow steps so the blocks can be seen
        engine.fault_hook = lambda stage, rows: time.sleep(0.05)
    params = SamplingParams(max_new_tokens=200 if which == "tiny" else 400, temperature=0.8, ignore_eos=True)
    ids = [window.bridge.submit(KV_PROMPT, params)]
    wait(0.5)
    ids += [window.bridge.submit(KV_PROMPT + extra, params) for extra in ("Lily", "Tom")]
    ids += [window.bridge.submit(prompt, params) for prompt in OTHER_PROMPTS]
    wait(1.5)
    window.kv_tab.refresh()
    shoot(window, "kv-cache", out)
    for rid in ids:
        window.bridge.cancel(rid)
    engine.fault_hook = None
    wait(0.5)


if __name__ == "__main__":
    sys.exit(main())
