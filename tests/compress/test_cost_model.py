"""The llama.cpp cost model: the fit recovers known per-unit costs, a model from another host is never
reused silently, probe GGUFs cut from a dense file have the layouts asked for (and, marked llamacpp, load
and time in llama.cpp)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from edgeprune.compress import cost_model as cm
from edgeprune.core.errors import EdgePruneError


def synthetic(layers):
    # a known cost: 5 ms fixed, 0.2 ms per layer, 0.05 per attention sublayer, 0.01 per head, 1e-4 per neuron
    return sum(c * x for c, x in zip((5e-3, 2e-4, 5e-5, 1e-5, 1e-7), cm.features(layers)))


def fake_model(fingerprint, prompt=128):
    layouts = cm.probe_layouts(9, 3, 1536, 30)
    rows = [dict(name=n, layers=len(l), features=cm.features(l), prefill_s=synthetic(l) * 8,
                 decode_s=synthetic(l)) for n, l in layouts.items()]
    prefill, decode, rows = cm.fit(rows)
    return cm.CostModel("llamacpp", prompt, 2, prefill, decode, fingerprint, rows)


def test_fit_recovers_per_unit_costs_and_predicts_unseen_layouts():
    model = fake_model({"cpu": "x"})
    assert model.fit_error()["decode"] < 1e-9
    mixed = [(6, 2, 1024)] * 10 + [(0, 0, 1536)] * 5 + [(9, 3, 512)] * 7  # not among the probes
    assert model.predict(mixed)["decode_s"] == pytest.approx(synthetic(mixed), rel=1e-6)
    dense = [(9, 3, 1536)] * 30
    assert model.speedup(mixed, dense)["decode"] == pytest.approx(synthetic(dense) / synthetic(mixed), rel=1e-6)
    assert model.per_unit()["decode_ms"]["layers"] == pytest.approx(0.2, rel=1e-6)
    # the file round-trips
    again = cm.CostModel.from_dict(json.loads(json.dumps(model.to_dict())))
    assert again.predict(mixed) == pytest.approx(model.predict(mixed))


def test_probe_layouts_vary_every_feature():
    import numpy as np

    layouts = cm.probe_layouts(9, 3, 1536, 30)
    x = np.asarray([cm.features(l) for l in layouts.values()])
    assert np.linalg.matrix_rank(x) == len(cm.FEATURES)
    assert all(f % 32 == 0 for l in layouts.values() for _, _, f in l)  # q4_0 blocks of 32


def test_cost_model_from_another_host_is_remeasured_or_refused(tmp_path, monkeypatch, capsys):
    source = tmp_path / "dense.gguf"
    source.write_bytes(b"GGUF")
    here = cm.host_fingerprint(2, {"flags": 1})
    monkeypatch.setattr("edgeprune.runtime.llamacpp_adapter.build_flags", lambda: {"flags": 1})
    measured = []
    monkeypatch.setattr(cm, "measure", lambda *a, **k: measured.append(1) or fake_model(here))
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    foreign = tmp_path / "foreign.json"
    cm.save(fake_model(dict(here, cpu="Another CPU")), foreign)
    with pytest.raises(EdgePruneError, match="another host"):
        cm.load_or_measure(source, path=foreign, reuse_foreign=False)
    assert not measured
    model, path, how = cm.load_or_measure(source, path=foreign)
    assert how == "re-measured" and measured == [1] and model.fingerprint == here
    err = capsys.readouterr().err
    assert "measured on another host" in err and "Another CPU" in err
    assert path != foreign and json.loads(foreign.read_text())["fingerprint"]["cpu"] == "Another CPU"  # kept
    # the new measurement went into this host's cache, which is then used as it is
    _, path2, how2 = cm.load_or_measure(source)
    assert how2 == "cached" and path2 == path and measured == [1]
    _, _, how3 = cm.load_or_measure(source, remeasure=True)
    assert how3 == "measured" and measured == [1, 1]


@pytest.fixture(scope="module")
def dense_gguf(tmp_path_factory):
    """A tiny dense llama q8_0 GGUF written by the project's exporter (no llama.cpp needed to write it)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "exporters"))
    from test_gguf_export import make_bpe_llama

    from edgeprune.core.ggufio import export_loaded
    from edgeprune.core.loading import load_model

    work = tmp_path_factory.mktemp("cost")
    loaded = load_model(make_bpe_llama(work / "hf"))
    path = work / "dense.gguf"
    export_loaded(loaded, path, "q8_0", progress=False)
    return path


def test_probe_ggufs_have_the_requested_layouts(dense_gguf, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    heads, kv, ffn, count = cm.dense_layout(dense_gguf)
    assert (heads, kv, ffn, count) == (4, 2, 128, 2)
    layouts = {tmp_path / "a.gguf": [(2, 1, 64), (0, 0, 128)], tmp_path / "b.gguf": [(4, 2, 32)]}
    cm.write_probe_ggufs(dense_gguf, layouts)
    for path, layers in layouts.items():
        assert cm.gguf_layers(path) == layers
    with pytest.raises(EdgePruneError, match="larger than the dense"):
        cm.write_probe_ggufs(dense_gguf, {tmp_path / "c.gguf": [(8, 2, 128)]})


@pytest.mark.llamacpp
def test_probes_load_and_time_in_llamacpp(dense_gguf, llamacpp_runtime, tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path))
    model = cm.measure(dense_gguf, threads=1, prompt=8, new_tokens=2, rounds=1, progress=False)
    assert len(model.probes) == len(cm.probe_layouts(4, 2, 128, 2))
    assert all(p["decode_s"] > 0 and p["prefill_s"] > 0 for p in model.probes)
    assert model.fingerprint == cm.host_fingerprint(1, __import__(
        "edgeprune.runtime.llamacpp_adapter", fromlist=["build_flags"]).build_flags())


def test_cut_gguf_drops_blocks_and_attention_keeping_tensors_bit_identical(dense_gguf, tmp_path):
    import gguf
    import numpy as np

    out = cm.cut_gguf(dense_gguf, tmp_path / "cut.gguf", drop_blocks=[0])
    assert cm.gguf_layers(out) == [(4, 2, 128)]
    src = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(dense_gguf)).tensors}
    cut = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(str(out)).tensors}
    assert np.array_equal(cut["blk.0.ffn_down.weight"], src["blk.1.ffn_down.weight"])  # block 1 became block 0
    assert np.array_equal(cut["token_embd.weight"], src["token_embd.weight"])
    out2 = cm.cut_gguf(dense_gguf, tmp_path / "attn.gguf", drop_attention=[1])
    assert cm.gguf_layers(out2) == [(4, 2, 128), (0, 0, 128)]
    assert "blk.1.attn_q.weight" not in {t.name for t in gguf.GGUFReader(str(out2)).tensors}
    for bad in ({"drop_blocks": [0, 1]}, {"drop_blocks": [2]}, {"drop_attention": [0]},
                {"drop_blocks": [1], "drop_attention": [1]}):
        with pytest.raises(EdgePruneError):
            cm.cut_gguf(dense_gguf, tmp_path / "bad.gguf", **bad)
    assert not (tmp_path / "bad.gguf").exists() and not (tmp_path / "bad.gguf.tmp").exists()


def test_suite_pareto_frontier():
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks" / "tools"))
    from decoder_edge_suite import pareto

    points = [(100, 0.30), (150, 0.20), (120, 0.25), (110, 0.10), (150, 0.15)]
    assert pareto(points) == [0, 1, 2]


def test_plan_removals_prices_units_by_the_cost_model():
    model = fake_model({"cpu": "x"})
    dense = [(9, 3, 1536)] * 30
    blocks = [1.0] + [0.5] * 10 + [0.02 + 0.001 * i for i in range(9)] + [0.5] * 9 + [1.0]
    plan = cm.plan_removals(model, dense, blocks, decode_speedup=1.2)  # ~7 blocks of this synthetic cost
    assert plan["predicted"]["decode"] >= 1.2
    assert set(plan["drop_blocks"]) <= set(range(11, 20)) and 0 not in plan["drop_blocks"]
    # attention sublayers that barely matter are taken before whole blocks that matter more
    attention = [0.001] * 30
    mixed = cm.plan_removals(model, dense, [0.5] * 30, attention, decode_speedup=1.05)
    assert mixed["drop_attention"] and not mixed["drop_blocks"]
    with pytest.raises(EdgePruneError, match="cannot be reached"):
        cm.plan_removals(model, dense, blocks, decode_speedup=50)
