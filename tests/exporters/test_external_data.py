"""ONNX external data: a graph whose weights exceed protobuf's 2 GB is saved as ``model.onnx`` plus
``model.onnx.data`` through every export step (optimum's file, the past-tolerant rewrite, fusion, folding,
quantization, the final file). The threshold is lowered here so that tiny models take the same path; the real
2 GB case is measured in benchmarks/RESULTS.md ("ONNX external data")."""

import numpy as np
import onnx
import pytest

import edgeprune.core.onnxio as onnxio
from edgeprune.core.artifacts import read_manifest, verify_files
from edgeprune.core.onnxio import external_files, ort_greedy, ort_session, save_onnx
from edgeprune.exporters.api import ExportConfig, export
from edgeprune.exporters.validate import ort_logits_fn
from test_export import uneven_artifact
from tiny import VOCAB_SIZE, sample_texts


@pytest.fixture
def tiny_threshold(monkeypatch):
    """Every tiny model counts as "over 2 GB"."""
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_ABOVE_BYTES", 1024)


def _assert_external_export(out):
    manifest = read_manifest(out)
    assert external_files(out / "model.onnx") == [out / "model.onnx.data"]
    assert (out / "model.onnx.data").stat().st_mode == (out / "model.onnx").stat().st_mode  # not private
    assert "model.onnx.data" in manifest["files"] and verify_files(out) == []
    variant = manifest["variants"][0]
    assert variant["external_data"] == ["model.onnx.data"]
    assert variant["bytes"] == (out / "model.onnx").stat().st_size + (out / "model.onnx.data").stat().st_size
    # nothing stale: no optimum-named data file, no second copy
    assert not [p.name for p in out.iterdir() if p.name.endswith(("_data", ".data")) and p.name != "model.onnx.data"]
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    # what ORT's quantizer writes uses the same layout: every tensor of over 1 KiB outside the graph
    assert all(i.data_location == onnx.TensorProto.EXTERNAL for i in graph.initializer if onnxio._tensor_nbytes(i) > 1024)
    return manifest


@pytest.mark.parametrize("quantize", ["none", "int8-dynamic", "int4-weight"])
def test_decoder_exports_with_external_data(tiny_models, tmp_path, tiny_threshold, quantize):
    """An uneven pruned decoder with KV cache: fp32, INT8 and GPTQ int4 files with their weights beside the
    graph pass their gates and decode like their own full recompute."""
    artifact, _ = uneven_artifact(tiny_models, "llama", tmp_path / "pruned")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(200, seed=4)) + "\n")
    config = ExportConfig(quantize=quantize, gate_tokens=256, calib=str(calib) if quantize == "int4-weight" else None,
                          weight_algorithm="gptq" if quantize == "int4-weight" else "auto", gptq_windows=8,
                          gptq_window_tokens=32)
    out = export(str(artifact), tmp_path / "e", config, progress=False)
    manifest = _assert_external_export(out)
    # optimum's tied-weight pass cannot save over 2 GB: edgeprune runs it (one initializer for the tied table)
    assert manifest["optimum"]["tied_weights"] == "deduplicated"
    graph = onnx.load(str(out / "model.onnx"), load_external_data=False).graph
    vocab_tables = [i.name for i in graph.initializer if VOCAB_SIZE in i.dims and len(i.dims) == 2]
    # no second LM head copy from the trace (an ``onnx::MatMul_N`` initializer); the shape folding's transposed
    # table is the same as in a one-file export
    assert not [name for name in vocab_tables if name.startswith("onnx::")], vocab_tables
    assert manifest["steps"]["simplify"]["nodes_after"] < manifest["steps"]["simplify"]["nodes_before"]
    assert all(v.get("passed", True) for v in manifest["validation"].values() if isinstance(v, dict))
    prompt = np.array([5, 9, 17, 33], dtype=np.int64)
    got = ort_greedy(ort_session(out / "model.onnx"), prompt, 6, manifest["kv_layout"])
    full = ort_logits_fn(out / "model.onnx", manifest["kv_layout"])(np.concatenate([prompt, got[:-1]])[None])
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == got


def test_encoder_fused_int8_static_with_external_data(tiny_models, tmp_path, tiny_threshold):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(80, seed=3)) + "\n")
    out = export(str(tiny_models("bert")), tmp_path / "e",
                 ExportConfig(optimize=True, quantize="int8-static", calib=str(calib), calib_samples=32),
                 progress=False)
    manifest = _assert_external_export(out)
    assert manifest["validation"]["int8"]["passed"] and manifest["steps"]["optimize"]["fused_operators"]


def test_export_of_an_external_data_export(tiny_models, tmp_path, tiny_threshold):
    """An ONNX export with external data is itself a valid source: re-exported (INT8) from its directory."""
    first = export(str(tiny_models("gpt2")), tmp_path / "fp32", ExportConfig(gate_tokens=256), progress=False)
    second = export(str(first), tmp_path / "int8", ExportConfig(quantize="int8-dynamic", gate_tokens=256),
                    progress=False)
    _assert_external_export(second)
    assert read_manifest(second)["validation"]["int8"]["passed"]


def test_save_onnx_below_the_threshold_is_one_file_and_removes_stale_data(tiny_models, tmp_path, monkeypatch):
    out = export(str(tiny_models("bert")), tmp_path / "e", ExportConfig(simplify=False), progress=False)
    model = onnx.load(str(out / "model.onnx"))
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_ABOVE_BYTES", 1024)
    save_onnx(model, tmp_path / "m.onnx")
    assert (tmp_path / "m.onnx.data").is_file()
    # the model keeps its data in memory after an external save
    assert all(i.data_location == onnx.TensorProto.DEFAULT for i in model.graph.initializer)
    monkeypatch.setattr(onnxio, "EXTERNAL_DATA_ABOVE_BYTES", 2**40)
    save_onnx(model, tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx.data").exists() and external_files(tmp_path / "m.onnx") == []


def test_a_file_that_is_not_onnx_is_its_own_file_set(tmp_path):
    """GGUF files go through the same size code (bench): no ONNX parsing, gzip of the file alone."""
    import gzip

    from edgeprune.core.onnxio import onnx_file_set
    from edgeprune.exporters.sparse import gzip_size

    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF" + bytes(range(256)) * 40)
    assert onnx_file_set(path) == [path]
    assert gzip_size(path) == len(gzip.compress(path.read_bytes(), compresslevel=6))
