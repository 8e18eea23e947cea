"""Built-in data keys: explicit path, hub through ``datasets`` (a local datasets-loadable folder stands in
for the hub: no network), cache, mirror fallback and the one-line error."""

import json
import time
from dataclasses import replace

import pytest

from edgeprune.core import data_sources
from edgeprune.core.data_sources import SOURCES, resolve_data
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.datasets import read_sts


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


def _tiny_sts(path, n=12):
    import random

    from tiny import sample_texts

    texts = sample_texts(2 * n, seed=5)
    rng = random.Random(0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(f"g\tf\t2012\t{i}\t{rng.uniform(0, 5):.2f}\t{texts[2 * i]}\t{texts[2 * i + 1]}\n"
                            for i in range(n)))
    return path


def test_calibration_and_finetuning_read_keys(isolated, monkeypatch):
    from edgeprune.compress.calibration import load_texts
    from edgeprune.compress.finetune import read_texts

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_sts(isolated / "mirror" / "stsb" / "sts-train.csv")
    texts = load_texts("stsb:train")
    assert len(texts) == 24 and read_texts("stsb:train") == texts


def test_eval_data_defaults_to_the_task_key(isolated, monkeypatch, tiny_models, capsys):
    from edgeprune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dev = _tiny_sts(isolated / "mirror" / "stsb" / "sts-dev.csv")
    assert main(["eval", str(tiny_models("bert")), "--task", "sts", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["data"] == str(dev) and result["n"] == 12


def test_data_list_shows_every_key_and_where_it_resolves(isolated, monkeypatch, capsys):
    from edgeprune.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _tiny_sts(isolated / "mirror" / "stsb" / "sts-dev.csv")
    assert main(["data", "list", "--json"]) == 0
    rows = {r["key"]: r for r in json.loads(capsys.readouterr().out.strip().splitlines()[-1])["data"]}
    assert set(rows) == set(SOURCES)
    assert rows["stsb:dev"]["resolves"].startswith("mirror ") and rows["stsb:dev"]["hub"].startswith("sentence-")
    assert rows["stsb:train"]["resolves"].startswith("not available")
