"""engine.hub against a stand-in hub on loopback serving the demo pair: search, details, drafts with the same
tokenizer, a download interrupted halfway that resumes with a Range request, disk space, offline, errors."""

from __future__ import annotations

import threading
from collections import namedtuple
from pathlib import Path

import pytest

from engine import hub
from engine.config import DEMO_DRAFT, DEMO_TARGET
from engine.loader import model_id
from tests.hub_stand_in import StandInHub, point_hub_at

pytestmark = pytest.mark.skipif(not (DEMO_TARGET / "model.safetensors").is_file(), reason="demo pair not present")


@pytest.fixture
def stand_in(tmp_path, monkeypatch):
    with StandInHub({"helix/demo-target": DEMO_TARGET, "helix/demo-draft": DEMO_DRAFT},
                    slow_bytes_per_s=40e6) as server:
        point_hub_at(server, tmp_path / "hub-cache", monkeypatch)
        yield server


def test_search_shows_size_architecture_and_licence(stand_in):
    results = hub.search("demo")
    assert {m.repo_id for m in results} == {"helix/demo-target", "helix/demo-draft"}
    target = next(m for m in results if m.repo_id == "helix/demo-target")
    assert target.architecture == "LlamaForCausalLM" and target.licence == "apache-2.0"
    assert target.num_parameters > 10_000_000 and target.size_bytes == 2 * target.num_parameters
    assert hub.search("no-such-thing") == []


def test_search_lists_text_and_image_models_whose_text_side_helix_runs(tmp_path, monkeypatch):
    """Gemma 3 from 4B on is tagged image-text-to-text on the hub: search lists it (the loader runs its text side), but
    not a text-and-image model transformers' AutoModelForCausalLM cannot load (LLaVA)."""
    import json

    from tests.hub_stand_in import Repo

    gemma, llava = tmp_path / "gemma", tmp_path / "llava"
    for folder, config in ((gemma, {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}),
                           (llava, {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]})):
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps(config))
    repos = {"helix/demo-target": DEMO_TARGET,
             "google/gemma-3-4b-it": Repo("google/gemma-3-4b-it", gemma, pipeline="image-text-to-text"),
             "llava-hf/llava-1.5-7b-hf": Repo("llava-hf/llava-1.5-7b-hf", llava, pipeline="image-text-to-text")}
    with StandInHub(repos) as server:
        point_hub_at(server, tmp_path / "hub-cache", monkeypatch)
        assert {m.repo_id for m in hub.search("")} == {"helix/demo-target", "google/gemma-3-4b-it"}
        assert [m.repo_id for m in hub.search("gemma")] == ["google/gemma-3-4b-it"]
        assert hub.search("gemma")[0].architecture == "Gemma3ForConditionalGeneration"


def test_details_list_the_files_and_drafts_match_by_tokenizer(stand_in):
    target, draft = hub.details("helix/demo-target"), hub.details("helix/demo-draft")
    assert {f.name for f in target.files} == {p.name for p in DEMO_TARGET.iterdir() if p.is_file()}
    assert target.size_bytes == sum(p.stat().st_size for p in DEMO_TARGET.iterdir() if p.is_file())
    assert target.tokenizer_fingerprint == draft.tokenizer_fingerprint is not None
    assert hub.matching_drafts(target, [draft, target]) == [draft]
    assert hub.matching_drafts(draft, [target]) == []  # a draft must be the smaller one
    with pytest.raises(hub.HubError, match="no such model"):
        hub.details("helix/nope")


def test_download_interrupted_halfway_resumes_with_a_range_request(stand_in, tmp_path):
    model = hub.details("helix/demo-target")
    weights = next(f for f in model.files if f.name == "model.safetensors")
    cancel, seen = threading.Event(), []

    def progress(done: int, total: int, name: str) -> None:
        seen.append((done, total, name))
        if name == "model.safetensors" and done > total // 2:
            cancel.set()  # the user presses Cancel halfway through the weights

    with pytest.raises(hub.DownloadCancelled, match="resume"):
        hub.download(model, progress, cancel)
    partial = hub.bytes_present(model)
    assert model.size_bytes // 2 < partial < model.size_bytes
    assert all(prev[0] <= nxt[0] for prev, nxt in zip(seen, seen[1:]))  # progress only goes forward
    assert seen[-1][1] == model.size_bytes

    snapshot = hub.download(model)
    ranges = [(path, rng) for method, path, rng in stand_in.requests if method == "GET" and rng]
    assert len(ranges) == 1 and ranges[0][0].endswith("/model.safetensors")
    offset = int(ranges[0][1].removeprefix("bytes=").rstrip("-"))
    assert 0 < offset < weights.size  # it asked only for the missing part
    for f in model.files:
        assert (snapshot / f.name).read_bytes() == (DEMO_TARGET / f.name).read_bytes()
    assert hub.bytes_present(model) == model.size_bytes
    before = len(stand_in.requests)
    assert hub.download(model) == snapshot  # all there: nothing is fetched again
    assert not [r for r in stand_in.requests[before:] if r[0] == "GET" and "/resolve/" in r[1]]

    assert model_id(str(snapshot)) == "helix/demo-target"  # the app and the API name it by its hub id


def test_a_connection_dropped_mid_file_resumes_on_the_next_try(tmp_path, monkeypatch):
    with StandInHub({"helix/demo-draft": DEMO_DRAFT}, drop_once_at=2_000_000) as server:
        point_hub_at(server, tmp_path / "hub-cache", monkeypatch)
        model = hub.details("helix/demo-draft")
        with pytest.raises(hub.HubError, match="connection dropped after .* download again to resume"):
            hub.download(model)
        kept = hub.bytes_present(model)
        snapshot = hub.download(model)
    ranges = [rng for method, _path, rng in server.requests if method == "GET" and rng]
    assert len(ranges) == 1 and 1_000_000 < int(ranges[0][6:-1]) <= 2_000_000  # what arrived was kept
    assert kept > 1_000_000
    assert (snapshot / "model.safetensors").read_bytes() == (DEMO_DRAFT / "model.safetensors").read_bytes()


def test_not_enough_disk_space_is_refused_before_downloading(stand_in, monkeypatch):
    model = hub.details("helix/demo-draft")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(hub.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 1000, 1000))
    with pytest.raises(hub.NotEnoughSpace, match="GB free"):
        hub.download(model)
    assert not [r for r in stand_in.requests if "/resolve/" in r[1]]


def test_offline_mode_says_so(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.is_offline()
    with pytest.raises(hub.HubError, match="offline"):
        hub.search("qwen")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "c"))
    assert hub.cache_dir() == tmp_path / "c"
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub.cache_dir() == Path(tmp_path / "home" / "hub")
