"""INT8 for DeepSparse: the static QDQ graph rewritten into SparseML's MatMulInteger form."""

import numpy as np
import onnx
import pytest

from edgeprune.core.artifacts import read_manifest
from edgeprune.exporters.api import ExportConfig, export
from edgeprune.core.onnxio import ort_session, run_session
from tests.tiny import sample_texts


def _int8_export(tiny_models, tmp_path, name="e"):
    calib = tmp_path / "calib.txt"
    if not calib.exists():
        calib.write_text("\n".join(sample_texts(80, seed=3)) + "\n")
    return export(str(tiny_models("bert")), tmp_path / name,
                  ExportConfig(quantize="int8-static", calib=str(calib), calib_samples=32, target="deepsparse",
                               min_cosine=0.9),  # random weights: INT8 cosine ~0.987; this checks the form
                  progress=False)


def test_int8_static_for_deepsparse_is_matmulinteger(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("edgeprune.runtime.deepsparse_adapter.deepsparse_python", lambda: None)  # compiled in the test below
    out = _int8_export(tiny_models, tmp_path)
    manifest = read_manifest(out)
    form = manifest["steps"]["quantize"]["deepsparse_form"]
    assert form["matmul_integer"] > 0 and form["uint8_embeddings"] >= 1 and form["not_converted"] == 0
    assert manifest["validation"]["int8"]["passed"]  # the rewritten graph passed the task gate against fp32
    model = onnx.load(str(out / manifest["files_by_role"]["deepsparse"]))
    assert model.ir_version <= 9 and not model.graph.sparse_initializer
    inits = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    integer = [n for n in model.graph.node if n.op_type == "MatMulInteger"]
    assert len(integer) == form["matmul_integer"]
    for node in integer:  # static QuantizeLinear input, constant uint8 weights around zero point 128
        assert producer[node.input[0]].op_type == "QuantizeLinear"
        assert inits[node.input[1]].data_type == onnx.TensorProto.UINT8
        assert onnx.numpy_helper.to_array(inits[node.input[3]]) == 128
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[0] in inits:  # embedding tables gathered as uint8
            assert inits[node.input[0]].data_type == onnx.TensorProto.UINT8
        if node.op_type in ("MatMul", "Gather"):  # nothing reads a dequantized constant any more
            dequantized = [producer[i] for i in node.input if i in producer and producer[i].op_type == "DequantizeLinear"]
            assert not any(d.input[0] in inits for d in dequantized)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}


@pytest.mark.deepsparse
def test_deepsparse_runs_the_int8_form(tiny_models, tmp_path, deepsparse_runtime):
    out = _int8_export(tiny_models, tmp_path)
    report = read_manifest(out)["validation"]["deepsparse"]
    assert report["checked"]  # compiled and ran in DeepSparse (the QDQ form aborts its compiler)
    feeds = {"input_ids": np.array([[2, 10, 11, 12, 13, 14, 15, 3]]), "attention_mask": np.ones((1, 8), np.int64),
             "token_type_ids": np.zeros((1, 8), np.int64)}
    expected = run_session(ort_session(out / "model.onnx"), feeds)["last_hidden_state"][0]
    session = deepsparse_runtime.load(str(out), threads=1)
    try:
        got = session.run(feeds)["last_hidden_state"][0]
    finally:
        session.close()
    cosine = (got * expected).sum(-1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(expected, axis=-1)
    assert cosine.min() > 0.99  # both are INT8 approximations; the kernels round differently
