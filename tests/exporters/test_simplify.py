"""Shape-arithmetic folding: fewer operators, static attention reshapes, identical outputs at any shape
(batch, sequence and KV-cache lengths), also for pruned models whose layers keep different head counts."""

import collections

import numpy as np
import onnx
import pytest

from edgeprune.core.artifacts import read_manifest
from edgeprune.compress.api import CompressConfig
from edgeprune.core.model_artifact import save_artifact
from edgeprune.compress.surgery import apply_plan
from edgeprune.exporters.api import ExportConfig, export
from edgeprune.exporters.simplify import simplify
from edgeprune.core.onnxio import ort_session, random_feeds, run_session
from edgeprune.core.loading import load_model
from tiny import uneven_plan


def op_counts(path):
    return collections.Counter(n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node)


def uneven(tiny_models, family, directory):
    loaded = load_model(tiny_models(family))
    apply_plan(loaded.model, loaded.adapter, uneven_plan(loaded))
    save_artifact(directory, loaded, CompressConfig().to_dict(), None, plan=uneven_plan(load_model(tiny_models(family))))
    return directory, loaded.model.config.vocab_size


@pytest.mark.parametrize("family", ["bert", "distilbert", "gpt2", "llama"])
def test_folding_keeps_outputs_at_every_shape(tiny_models, family, tmp_path):
    source, vocab = uneven(tiny_models, family, tmp_path / "pruned")
    raw = export(str(source), tmp_path / "raw", ExportConfig(simplify=False), progress=False)
    stats = simplify(raw / "model.onnx", tmp_path / "simple.onnx")
    assert stats["nodes_after"] < stats["nodes_before"] and stats["reshapes_made_static"] > 0
    before, after = op_counts(raw / "model.onnx"), op_counts(tmp_path / "simple.onnx")
    assert after["Shape"] < before["Shape"] and after["Reshape"] == before["Reshape"]
    a, b = ort_session(raw / "model.onnx"), ort_session(tmp_path / "simple.onnx")
    names = [i.name for i in a.get_inputs()]
    layout = read_manifest(raw).get("kv_layout")
    rng = np.random.default_rng(0)
    for batch, seq, past in [(1, 1, 0), (3, 17, 0), (2, 64, 0), (2, 1, 5), (1, 4, 9)]:
        if past and layout is None:
            continue
        feeds = random_feeds(names, batch, seq, past, vocab, layout, rng, pad_last=True)
        want, got = run_session(a, feeds), run_session(b, feeds)
        for name in want:
            np.testing.assert_allclose(got[name], want[name], atol=1e-5, rtol=1e-5,
                                       err_msg=f"{family} {name} at {batch}x{seq}+{past}")


def test_export_simplifies_by_default_and_validates(tiny_models, tmp_path):
    out = export(str(tiny_models("bert")), tmp_path / "e", progress=False)
    manifest = read_manifest(out)
    assert manifest["config"]["simplify"] is True
    assert manifest["validation"]["simplified"]["passed"]
    assert manifest["steps"]["simplify"]["nodes_after"] < manifest["steps"]["simplify"]["nodes_before"]
    plain = export(str(tiny_models("bert")), tmp_path / "plain", ExportConfig(simplify=False), progress=False)
    assert "simplify" not in read_manifest(plain)["steps"]
    assert op_counts(out / "model.onnx")["Shape"] < op_counts(plain / "model.onnx")["Shape"]
