"""Built-in data keys: explicit path, hub through ``datasets`` (a local datasets-loadable folder stands in
for the hub: no network), cache, mirror fallback and the one-line error."""

import json
import time
from dataclasses import replace

import pytest

from edgeprune import data_sources
from edgeprune.data_sources import SOURCES, resolve_data
from edgeprune.errors import EdgePruneError
from edgeprune.eval.data import read_sts


@pytest.fixture
def isolated(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path / "mirror"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    return tmp_path


def fake_hub(monkeypatch, key, folder, **changes):
    monkeypatch.setitem(SOURCES, key, replace(SOURCES[key], hub=str(folder), hub_config=None, **changes))
    monkeypatch.setattr(data_sources, "hub_reachable", lambda: True)


def test_explicit_path_wins(isolated):
    own = isolated / "mine.txt"
    own.write_text("hello\n")
    assert resolve_data(own) == own


def test_hub_stsb_converted_to_sts_tsv_and_cached(isolated, monkeypatch):
    hub = isolated / "hub-stsb"
    hub.mkdir()
    rows = [{"sentence1": "A man\tplays.", "sentence2": "A man is playing.", "score": 0.8},
            {"sentence1": "A cat.", "sentence2": "A dog\nruns.", "score": 0.1}]
    (hub / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_hub(monkeypatch, "stsb:dev", hub)
    path = resolve_data("stsb:validation")  # alias of stsb:dev
    pairs = read_sts(path)
    assert [(p.sentence1, p.sentence2, p.score) for p in pairs] == [
        ("A man plays.", "A man is playing.", 4.0), ("A cat.", "A dog runs.", 0.5)]
    assert path.parent == isolated / "cache" / "data"
    # Second call: served from the cache even when the hub is gone.
    monkeypatch.setattr(data_sources, "hub_reachable", lambda: False)
    assert resolve_data("stsb:dev") == path


def test_hub_subset_rows_and_jsonl_fields(isolated, monkeypatch):
    hub = isolated / "hub-piqa"
    hub.mkdir()
    rows = [{"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2, "extra": 1} for i in range(5)]
    (hub / "validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fake_hub(monkeypatch, "piqa:dev", hub, rows=3)
    lines = resolve_data("piqa:dev").read_text().splitlines()
    assert [json.loads(line) for line in lines] == [
        {"goal": f"g{i}", "sol1": "a", "sol2": "b", "label": i % 2} for i in range(3)]


def test_mirror_fallback_when_offline(isolated, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mirrored = isolated / "mirror" / "wikitext-2" / "valid.txt"
    mirrored.parent.mkdir(parents=True)
    mirrored.write_text(" = Title = \n")
    assert resolve_data("wikitext2:validation") == mirrored
    assert resolve_data("wikitext-2/valid.txt") == mirrored  # older recipes name mirror paths


def test_hub_failure_falls_back_to_mirror(isolated, monkeypatch):
    fake_hub(monkeypatch, "lambada:dev", isolated / "no-such-hub-dir")
    mirrored = isolated / "mirror" / "lambada" / "lambada-dev.jsonl"
    mirrored.parent.mkdir(parents=True)
    mirrored.write_text('{"text": "a b c"}\n')
    assert resolve_data("lambada:dev") == mirrored


def test_nothing_reachable_is_one_fast_line(isolated, monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(EdgePruneError) as err:
        resolve_data("stsb:train")
    assert time.perf_counter() - started < 5
    message = str(err.value)
    assert "\n" not in message
    for needed in ("stsb:train", "sentence-transformers/stsb", "EDGEPRUNE_DATA", "local file"):
        assert needed in message


def test_unknown_reference(isolated):
    with pytest.raises(EdgePruneError, match="not a built-in data set"):
        resolve_data("nope/missing.csv")
    with pytest.raises(EdgePruneError, match="not a file"):
        resolve_data(isolated)


def test_unreachable_hub_probe_is_quick(monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "https://hub.invalid")
    started = time.perf_counter()
    assert data_sources.hub_reachable() is False
    assert time.perf_counter() - started < data_sources.HUB_PROBE_SECONDS + 1
