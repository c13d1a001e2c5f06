"""The JavaScript client example (README and /docs) against a real server with CORS on loopback: the page in
Debian's headless chromium (Selenium) and the Node script; tokens arrive incrementally, `done` carries the
stats, a wrong key shows the 401 message."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
from tiny import tiny_engine

from engine.host import EngineHost
from engine.server import ServerRunner
from engine.server.js_example import BROWSER_PAGE, NODE_SCRIPT

KEY = "js-example-key"
CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def page_origin(tmp_path_factory):
    """The page on its own loopback origin, as a web app on another port would serve it."""
    folder = tmp_path_factory.mktemp("page")
    (folder / "index.html").write_text(BROWSER_PAGE, encoding="utf-8")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def server(page_origin):
    host = EngineHost()
    engine = tiny_engine()
    engine.fault_hook = lambda stage, rows: time.sleep(0.01)  # slow enough to watch tokens arrive
    host.adopt(engine)
    runner = ServerRunner(host, port=0, api_key=KEY, cors_origins=[page_origin])
    runner.start()
    yield runner
    runner.stop()
    host.shutdown()


def test_docs_and_readme_carry_the_example(server):
    description = httpx.get(f"{server.url}/openapi.json", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "getReader()" in description["info"]["description"] and "/generate/stream" in description["info"]["description"]
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert BROWSER_PAGE in readme and NODE_SCRIPT in readme, "README's JavaScript example differs from /docs"


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_node_script_streams_and_reports_a_wrong_key(server, tmp_path):
    script = tmp_path / "helix-stream.mjs"
    script.write_text(NODE_SCRIPT, encoding="utf-8")
    env = {**os.environ, "HELIX_URL": server.url, "HELIX_API_KEY": KEY}
    ok = subprocess.run(["node", str(script), "Once upon a time"], env=env, capture_output=True, text=True,
                        timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() and " tokens, " in ok.stderr and "tok/s" in ok.stderr
    bad = subprocess.run(["node", str(script)], env={**env, "HELIX_API_KEY": "wrong"}, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 1 and "HTTP 401: invalid API key" in bad.stderr, bad.stderr


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip("Debian's chromium and chromium-driver are not installed "
                    "(apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[test]')")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))
    yield driver
    driver.quit()


def _run_page(browser, page_origin, server_url, key):
    from selenium.webdriver.common.by import By

    browser.get(f"{page_origin}/index.html")
    field = {name: browser.find_element(By.ID, name) for name in ("url", "key", "out", "stats", "error")}
    field["url"].clear()
    field["url"].send_keys(server_url)
    field["key"].send_keys(key)
    browser.find_element(By.ID, "go").click()
    lengths, deadline = [], time.monotonic() + 30
    while time.monotonic() < deadline and not (field["stats"].text or field["error"].text):
        lengths.append(len(browser.execute_script("return document.getElementById('out').textContent")))
    return field, lengths


def test_browser_page_streams_tokens_and_shows_the_stats(browser, page_origin, server):
    field, lengths = _run_page(browser, page_origin, server.url, KEY)
    assert not field["error"].text, field["error"].text
    partial = sorted({n for n in lengths if n > 0})
    assert len(partial) >= 3, f"the text did not grow token by token: lengths seen {partial}"
    stats = field["stats"].text
    assert " tokens, " in stats and "tok/s" in stats and "acceptance" in stats, stats
    assert len(field["out"].text) >= max(partial)


def test_browser_page_shows_the_401_message(browser, page_origin, server):
    field, _ = _run_page(browser, page_origin, server.url, "wrong-key")
    assert field["error"].text == "HTTP 401: invalid API key" and not field["stats"].text
