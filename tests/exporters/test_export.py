"""Export -> ONNX Runtime matches PyTorch for every tiny family, pruned uneven models, KV-cache generation,
INT8 and sparse variants, the DeepSparse target, optimum ORTModel loading, and bad inputs."""

import json

import numpy as np
import onnx
import pytest
import torch

from edgeprune.core.artifacts import read_manifest
from edgeprune.core.model_artifact import save_artifact
from edgeprune.compress.api import CompressConfig
from edgeprune.compress.surgery import apply_plan
from edgeprune.core.errors import EdgePruneError
from edgeprune.exporters.api import DENSE_FILE, ExportConfig, export
from edgeprune.runtime.deepsparse_adapter import deepsparse_python
from edgeprune.core.onnxio import ort_greedy, ort_session, run_session
from edgeprune.exporters.validate import ort_logits_fn, torch_greedy
from edgeprune.core.loading import load_model
from tiny import ort_vs_torch, sample_texts, uneven_plan

DECODERS = ("gpt2", "llama", "qwen2")


def uneven_artifact(tiny_models, family, directory):
    """A compressed artifact whose layers keep different numbers of (KV) heads and FFN neurons."""
    loaded = load_model(tiny_models(family))
    adapter = loaded.adapter
    plan = uneven_plan(loaded)
    apply_plan(loaded.model, adapter, plan)
    save_artifact(directory, loaded, CompressConfig().to_dict(), None, plan=plan)
    return directory, plan


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert"])
def test_encoder_export_matches_torch(tiny_models, family, tmp_path):
    out = export(str(tiny_models(family)), tmp_path / "e", progress=False)
    manifest = read_manifest(out)
    assert manifest["stage"] == "export" and manifest["task"] == "feature-extraction"
    assert manifest["files_by_role"]["onnxruntime"] == "model.onnx"
    assert manifest["validation"]["fp32"]["passed"]
    assert manifest["validation"]["fp32"]["outputs"]["last_hidden_state"]["max_abs"] < 1e-4
    assert {"config.json", "tokenizer.json", "model.onnx"} <= {p.name for p in out.iterdir()}
    assert ort_vs_torch(out, tiny_models(family), sample_texts(4)) < 1e-4
    variant = manifest["variants"][0]
    assert variant["bytes"] == (out / "model.onnx").stat().st_size and 0 < variant["gzip_bytes"] < variant["bytes"]
    assert variant["nonzeros"] <= variant["elements"] and variant["opset"] == 17


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])
def test_uneven_pruned_model_exports(tiny_models, family, tmp_path):
    artifact, plan = uneven_artifact(tiny_models, family, tmp_path / "pruned")
    assert len({s.heads for s in plan.shapes}) == 2
    out = export(str(artifact), tmp_path / "e", progress=False)
    manifest = read_manifest(out)
    assert manifest["parent"]["stage"] == "compress"
    assert manifest["validation"]["fp32"]["passed"]
    if family == "bert":
        assert ort_vs_torch(out, artifact, sample_texts(3, seed=2)) < 1e-4
    else:
        layout = manifest["kv_layout"]
        assert [l["kv_heads"] for l in layout] == [s.kv_heads for s in plan.shapes]
        assert manifest["validation"]["fp32"]["generation"]["match"]
        assert manifest["with_past"]


@pytest.mark.parametrize("family", ["gpt2", *(pytest.param(f, marks=pytest.mark.slow) for f in DECODERS[1:])])
def test_decoder_greedy_8_tokens_with_kv_cache(tiny_models, family, tmp_path):
    out = export(str(tiny_models(family)), tmp_path / "e", progress=False)
    manifest = read_manifest(out)
    session = ort_session(out / "model.onnx")
    inputs = {i.name for i in session.get_inputs()}
    assert {"input_ids", "attention_mask", "past_key_values.0.key", "past_key_values.1.value"} <= inputs
    assert {"logits", "present.0.key", "present.1.value"} <= {o.name for o in session.get_outputs()}
    model = load_model(tiny_models(family)).model
    for prompt in ([7, 8, 9], [20, 21, 22, 23, 24, 25]):
        prompt = np.array(prompt, dtype=np.int64)
        assert ort_greedy(session, prompt, 8, manifest["kv_layout"]) == torch_greedy(model, prompt, 8)


def test_uneven_decoder_loads_in_optimum_and_generates(tiny_models, tmp_path):
    """ORTModelForCausalLM builds its first (empty) past from the dense config; the export tolerates that."""
    from optimum.onnxruntime import ORTModelForCausalLM

    artifact, _ = uneven_artifact(tiny_models, "llama", tmp_path / "pruned")
    out = export(str(artifact), tmp_path / "e", progress=False)
    assert read_manifest(out)["optimum"]["past_tolerant"]
    ort_model = ORTModelForCausalLM.from_pretrained(out)
    torch_model = load_model(artifact).model
    prompt = torch.tensor([[7, 8, 9, 10]])
    kwargs = dict(max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=0)
    ours = ort_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    theirs = torch_model.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert ours.tolist() == theirs.tolist()


def test_encoder_loads_in_optimum(tiny_models, tmp_path):
    from optimum.onnxruntime import ORTModelForFeatureExtraction

    out = export(str(tiny_models("bert")), tmp_path / "e", progress=False)
    model = ORTModelForFeatureExtraction.from_pretrained(out)
    loaded = load_model(tiny_models("bert"))
    batch = loaded.tokenizer(sample_texts(2), padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = loaded.model(**batch).last_hidden_state
    got = model(**batch).last_hidden_state
    mask = batch["attention_mask"].bool()
    assert torch.allclose(got[mask], ref[mask], atol=1e-4)


def test_sequence_classification_export(tiny_models, tmp_path):
    out = export(str(tiny_models("bert", task="sequence-classification")), tmp_path / "e",
                 ExportConfig(task="sequence-classification", quantize="int8-dynamic"), progress=False)
    manifest = read_manifest(out)
    assert manifest["task"] == "sequence-classification"
    assert "logits" in manifest["validation"]["fp32"]["outputs"]
    assert manifest["validation"]["int8"]["metric"] == "top1_agreement"


def test_optimized_uneven_encoder(tiny_models, tmp_path):
    artifact, _ = uneven_artifact(tiny_models, "bert", tmp_path / "pruned")
    out = export(str(artifact), tmp_path / "e", ExportConfig(optimize=True), progress=False)
    manifest = read_manifest(out)
    assert manifest["validation"]["optimized"]["passed"]
    fused = manifest["steps"]["optimize"]["fused_operators"]
    # fusion runs before shape folding (folded reshapes hide the attention pattern from it)
    assert fused.get("Attention") == 2, fused
    assert "SkipLayerNormalization" not in fused  # slower than Add + LayerNormalization on CPU
    assert [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node].count("Attention") == 2
    assert manifest["files_by_role"]["deepsparse"] is None  # com.microsoft operators
    assert ort_vs_torch(out, artifact, sample_texts(3)) < 1e-3


def test_optimized_int8_quantizes_attention_and_embeddings(tiny_models, tmp_path):
    artifact, _ = uneven_artifact(tiny_models, "bert", tmp_path / "pruned")
    out = export(str(artifact), tmp_path / "e", ExportConfig(optimize=True, quantize="int8-dynamic"), progress=False)
    manifest = read_manifest(out)
    assert "EmbedLayerNormalization" not in manifest["steps"]["optimize"]["fused_operators"]  # keeps fp32 tables
    assert manifest["validation"]["int8"]["passed"]
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    assert ops.count("QAttention") == 2 and "Attention" not in ops
    assert any(op == "Gather" for op in ops) and "DequantizeLinear" in ops  # the embedding table is INT8


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_int8_dynamic(tiny_models, family, tmp_path):
    out = export(str(tiny_models(family)), tmp_path / "e", ExportConfig(quantize="int8-dynamic", gate_tokens=256),
                 progress=False)
    manifest = read_manifest(out)
    gate = manifest["validation"]["int8"]
    if family == "gpt2":  # decoders: perplexity and greedy agreement decide, not top-1 agreement
        assert gate["metric"] == "decoder_quality" and gate["perplexity"]["ratio"] <= gate["perplexity"]["max_ratio"]
        assert gate["passed"] and gate["greedy"]["agreement"] >= gate["greedy"]["min_agreement"]
    else:
        assert gate["passed"] and gate["value"] >= gate["threshold"]
    assert manifest["variants"][0]["quantization"] == "int8-dynamic"
    ops = {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert "MatMulInteger" in ops or "DynamicQuantizeMatMul" in ops


def test_int4_weight_uneven_decoder_with_kv_cache(tiny_models, tmp_path):
    artifact, plan = uneven_artifact(tiny_models, "llama", tmp_path / "pruned")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(120, seed=4)) + "\n")
    # no shape folding: the tied LM head stays MatMul(x, Transpose(embedding)), as SmolLM2's does after folding
    out = export(str(artifact), tmp_path / "e", ExportConfig(quantize="int4-weight", weight_algorithm="rtn",
                                                               calib=str(calib), simplify=False, gate_tokens=256),
                 progress=False)
    manifest = read_manifest(out)
    gate = manifest["validation"]["weight_only"]
    assert gate["metric"] == "decoder_quality" and gate["passed"] and gate["data"].startswith(str(calib))
    assert gate["perplexity"]["tokens"] > 200 and gate["greedy"]["new_tokens"] == 32
    ops = [n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node]
    # every block Linear and the LM head (tied to the embedding) -> MatMulNBits; the embedding Gather too
    assert ops.count("MatMulNBits") == 7 * len(plan.shapes) + 1 and ops.count("GatherBlockQuantized") == 1
    assert manifest["steps"]["quantize"]["embeddings"] == "GatherBlockQuantized int4"
    assert manifest["steps"]["quantize"]["converted_from_opset"] == 17 and manifest["variants"][0]["opset"] == 21
    assert manifest["steps"]["quantize"]["transposed_weights_folded"] == ["/lm_head/MatMul"]
    assert manifest["variants"][0]["quantization"] == "int4-weight"
    # The quantized file's KV-cache path agrees with its own full recompute (teacher-forced on its tokens).
    prompt = np.array([5, 9, 17, 33], dtype=np.int64)
    got = ort_greedy(ort_session(out / "model.onnx"), prompt, 6, manifest["kv_layout"])
    full = ort_logits_fn(out / "model.onnx", manifest["kv_layout"])(np.concatenate([prompt, got[:-1]])[None])
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == got


def test_int4_weight_hqq_uneven_decoder_with_kv_cache(tiny_models, tmp_path):
    """HQQ: every block MatMul and the LM head become 4-bit MatMulNBits at the requested accuracy level, their
    float zero points folded into the symmetric fast-kernel form plus a per-block fp32 correction; the embedding
    Gather goes through 8-bit RTN (ORT's GatherBlockQuantized has no float zero points); the KV-cache file
    passes the decoder gate and decodes like its own full recompute."""
    artifact, plan = uneven_artifact(tiny_models, "llama", tmp_path / "pruned")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(120, seed=4)) + "\n")
    out = export(str(artifact), tmp_path / "e", ExportConfig(quantize="int4-weight", weight_algorithm="hqq",
                                                               calib=str(calib), gate_tokens=256), progress=False)
    manifest = read_manifest(out)
    step = manifest["steps"]["quantize"]
    # the embedding table at the 8-bit LM head's width (the same tied matrix)
    assert step["algorithm"] == "hqq" and step["embeddings"] == "GatherBlockQuantized int8"
    assert manifest["validation"]["weight_only"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 7 * len(plan.shapes) + 1
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nbits)
    # the LM head: 8-bit RTN by default with HQQ (symmetric, no zero points to rewrite)
    assert all(len(n.input) == 3 for n in nbits) and step["float_zero_points_rewritten"] == len(nbits) - 1
    assert step["lm_head"]["bits"] == 8
    prompt = np.array([5, 9, 17, 33], dtype=np.int64)
    got = ort_greedy(ort_session(out / "model.onnx"), prompt, 6, manifest["kv_layout"])
    full = ort_logits_fn(out / "model.onnx", manifest["kv_layout"])(np.concatenate([prompt, got[:-1]])[None])
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == got


def test_int4_weight_gptq_uneven_decoder_with_kv_cache(tiny_models, tmp_path):
    """GPTQ: every block MatMul becomes a 4-bit MatMulNBits from the Hessians of the --calib windows, the LM head 8-bit RTN; the manifest names the calibration; the
    KV-cache file passes the decoder gate and decodes like its own full recompute."""
    artifact, plan = uneven_artifact(tiny_models, "llama", tmp_path / "pruned")
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(200, seed=4)) + "\n")
    out = export(str(artifact), tmp_path / "e", ExportConfig(quantize="int4-weight", weight_algorithm="gptq",
                                                               lm_head_bits=8, calib=str(calib), gptq_windows=16,
                                                               gptq_window_tokens=32, gate_tokens=256), progress=False)
    manifest = read_manifest(out)
    step = manifest["steps"]["quantize"]
    assert step["algorithm"] == "gptq" and step["gptq"]["zero_point"] == "float"
    assert step["gptq"]["nodes"] == 7 * len(plan.shapes) and step["gptq"]["calibration_tokens"] > 32
    assert step["calibration"]["source"].startswith(str(calib)) and "windows of 32 tokens" in step["calibration"]["source"]
    assert manifest["validation"]["weight_only"]["passed"]
    graph = onnx.load(str(out / "model.onnx")).graph
    nbits = [n for n in graph.node if n.op_type == "MatMulNBits"]
    # float zero points rewritten to the fast symmetric kernel plus the exact per-block correction
    assert len(nbits) == 7 * len(plan.shapes) + 1 and all(len(n.input) == 3 for n in nbits)
    assert step["float_zero_points_rewritten"] == 7 * len(plan.shapes)
    assert all(next(a.i for a in n.attribute if a.name == "accuracy_level") == 4 for n in nbits)
    weights = {i.name for i in graph.initializer if not i.name.endswith("__zp_correction")}
    assert not [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    prompt = np.array([5, 9, 17, 33], dtype=np.int64)
    got = ort_greedy(ort_session(out / "model.onnx"), prompt, 6, manifest["kv_layout"])
    full = ort_logits_fn(out / "model.onnx", manifest["kv_layout"])(np.concatenate([prompt, got[:-1]])[None])
    assert full[0, len(prompt) - 1:].argmax(-1).tolist() == got


@pytest.mark.parametrize("k", [64, 40])  # 40: a pruned width, its last block partial
def test_symmetric_zero_points_is_exact(tmp_path, k):
    """s·(q − z) = s·(q − 8) + s·(8 − z): the rewritten HQQ node computes what the float-zero-point node does
    (fp32 compute, accuracy level unset, so only float rounding differs)."""
    from onnx import TensorProto, helper, numpy_helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    from edgeprune.exporters.quantize import symmetric_zero_points

    rng = np.random.default_rng(0)
    weight = rng.standard_normal((k, 48)).astype(np.float32)
    other = rng.standard_normal((k, 16)).astype(np.float32)  # a second reader of x (as k_proj beside q_proj)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"]), helper.make_node("MatMul", ["x", "v"], ["u"])],
                              "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("u", TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(other, "v")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    model.ir_version = 10
    quantizer = MatMulNBitsQuantizer(model, algo_config=HQQWeightOnlyQuantConfig(
        block_size=32, bits=4, op_types_to_quantize=("MatMul",), quant_axes=(("MatMul", 0),)))
    quantizer.process()
    onnx.save(quantizer.model.model, str(tmp_path / "float.onnx"))
    rewritten = onnx.load(str(tmp_path / "float.onnx"))
    assert symmetric_zero_points(rewritten) == 2
    assert all(n.input[3:] == [] for n in rewritten.graph.node if n.op_type == "MatMulNBits")
    assert [n.op_type for n in rewritten.graph.node].count("ReduceSum") == 1  # the block sums of x, shared
    onnx.save(rewritten, str(tmp_path / "symmetric.onnx"))
    x = rng.standard_normal((1, 3, k)).astype(np.float32)
    want = ort_session(tmp_path / "float.onnx").run(None, {"x": x})
    got = ort_session(tmp_path / "symmetric.onnx").run(None, {"x": x})
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, atol=1e-4)
    assert np.abs(want[0] - x @ weight).max() > 1e-2  # it is a quantized product, not the fp32 one


@pytest.mark.parametrize("head_bits", [8, 0])
def test_int4_weight_lm_head_bits(tiny_models, tmp_path, head_bits):
    """--lm-head-bits: the MatMul writing logits gets its own width (8: RTN MatMulNBits bits=8; 0: stays an fp32
    MatMul), every block MatMul stays int4 (HQQ)."""
    out = export(str(tiny_models("llama")), tmp_path / "e", ExportConfig(quantize="int4-weight", weight_algorithm="hqq",
                                                                          lm_head_bits=head_bits, gate_tokens=256),
                 progress=False)
    graph = onnx.load(str(out / "model.onnx")).graph
    head = next(n for n in graph.node if "logits" in n.output)
    blocks = [n for n in graph.node if n.op_type == "MatMulNBits" and n is not head]
    assert blocks and all(next(a.i for a in n.attribute if a.name == "bits") == 4 for n in blocks)
    if head_bits:
        assert head.op_type == "MatMulNBits" and next(a.i for a in head.attribute if a.name == "bits") == 8
    else:
        assert head.op_type == "MatMul"
    step = read_manifest(out)["steps"]["quantize"]
    assert step["lm_head"]["bits"] == (head_bits or "fp32") and len(step["lm_head"]["nodes"]) == 1


def test_weight_only_defaults_resolve_per_width():
    from edgeprune.exporters.api import _weight_only_spec

    int4 = _weight_only_spec(ExportConfig(quantize="int4-weight"))
    assert (int4.algorithm, int4.bits, int4.head_bits) == ("gptq", 4, 8)
    int8 = _weight_only_spec(ExportConfig(quantize="int8-weight"))
    assert (int8.algorithm, int8.bits, int8.head_bits) == ("rtn", 8, 8)
    rtn = _weight_only_spec(ExportConfig(quantize="int4-weight", weight_algorithm="rtn"))
    assert (rtn.algorithm, rtn.head_bits) == ("rtn", 4)


def test_int8_weight_encoder(tiny_models, tmp_path):
    out = export(str(tiny_models("bert")), tmp_path / "e", ExportConfig(quantize="int8-weight"), progress=False)
    manifest = read_manifest(out)
    gate = manifest["validation"]["weight_only"]
    assert gate["metric"] == "mean_cosine" and gate["passed"] and gate["value"] > 0.999
    assert "MatMulNBits" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}
    assert manifest["steps"]["quantize"]["bits"] == 8
    assert manifest["steps"]["quantize"]["embeddings"] == "GatherBlockQuantized int8"
    assert "GatherBlockQuantized" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}


@pytest.mark.parametrize("flags, message", [
    ({"target": "deepsparse"}, "cannot be combined with --target deepsparse"),
    ({"sparse_initializers": "on"}, "cannot be combined with --sparse-initializers on"),
    ({"weight_block_size": 24}, "--block-size must be a power of two"),
    ({"weight_algorithm": "awq"}, "--weight-algorithm must be one of auto, rtn, hqq, gptq"),
    ({"lm_head_bits": 2}, "--lm-head-bits must be 0"),
])
def test_weight_only_bad_combinations(flags, message):
    with pytest.raises(EdgePruneError, match=message):
        ExportConfig(quantize="int4-weight", **flags)
    with pytest.raises(EdgePruneError, match="hqq is for int4-weight"):
        ExportConfig(quantize="int8-weight", weight_algorithm="hqq")


def test_weight_only_for_deepsparse_is_one_line_before_any_work(tiny_models, tmp_path, capsys):
    from test_cli_errors import assert_one_line_error, leftovers, run_cli

    code, _, err = run_cli(["export", tiny_models("bert"), "-o", tmp_path / "out", "--quantize", "int8-weight",
                            "--target", "deepsparse"], capsys)
    assert_one_line_error(code, err, "--quantize int8-weight", "--target deepsparse", "MatMulNBits")
    assert not leftovers(tmp_path, "out")


def test_a_model_whose_onnx_export_cannot_fit_in_memory_is_refused_before_loading(tiny_models, tmp_path, capsys,
                                                                                    monkeypatch):
    """The ONNX export traces the model in memory (peak ~4.3x the float32 weights, read from the shards'
    headers): a model that cannot fit is one line naming the streamed GGUF target, nothing written. Over 2 GB
    of weights alone is no longer a refusal (external data, test_external_data.py)."""
    from test_cli_errors import assert_one_line_error, leftovers, run_cli

    import edgeprune.compress.lazy_weights as lazy_weights
    import psutil

    from edgeprune.exporters.api import _check_onnx_export_fits_memory

    available = type("Memory", (), {"available": 16 * 10**9})()
    monkeypatch.setattr(psutil, "virtual_memory", lambda: available)
    monkeypatch.setattr(lazy_weights, "checkpoint_numel", lambda source: 1_073_809_408)  # 18.5 GB > 16 GB
    code, _, err = run_cli(["export", tiny_models("llama"), "-o", tmp_path / "out"], capsys)
    assert_one_line_error(code, err, "1.07 B parameters", "~18.5 GB", "16.0 GB available", "--target llamacpp")
    assert not leftovers(tmp_path, "out")
    monkeypatch.setattr(lazy_weights, "checkpoint_numel", lambda source: 900_000_000)  # 15.5 GB: goes on
    _check_onnx_export_fits_memory(tiny_models("llama"))


def test_int8_static_with_calibration(tiny_models, tmp_path):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(80, seed=3)) + "\n")
    out = export(str(tiny_models("bert")), tmp_path / "e",
                 ExportConfig(quantize="int8-static", calib=str(calib), calib_samples=32), progress=False)
    manifest = read_manifest(out)
    assert manifest["steps"]["quantize"]["format"] == "QDQ"
    assert manifest["validation"]["int8"]["passed"]
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(out / "model.onnx")).graph.node}


def sparse_artifact(tiny_models, directory, fraction=0.9):
    """Zero the smallest-magnitude ``fraction`` of every block weight matrix (unstructured sparsity)."""
    loaded = load_model(tiny_models("bert"))
    with torch.no_grad():
        for layer in loaded.adapter.layers(loaded.model):
            for name, param in layer.named_parameters():
                if param.dim() == 2:
                    k = int(param.numel() * fraction)
                    threshold = param.abs().flatten().kthvalue(k).values
                    param[param.abs() <= threshold] = 0.0
    save_artifact(directory, loaded, CompressConfig().to_dict(), None)
    return directory


def test_sparse_initializers_shrink_and_deepsparse_gets_dense(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setattr("edgeprune.runtime.deepsparse_adapter.deepsparse_python", lambda: None)  # compiled in its own test
    artifact = sparse_artifact(tiny_models, tmp_path / "sparse")
    dense = export(str(artifact), tmp_path / "dense", ExportConfig(sparse_initializers="off"), progress=False)
    out = export(str(artifact), tmp_path / "e", ExportConfig(sparse_initializers="on", target="deepsparse"),
                 progress=False)
    manifest = read_manifest(out)
    variants = {v["file"]: v for v in manifest["variants"]}
    sparse_v, dense_v = variants["model.onnx"], variants[DENSE_FILE]
    assert sparse_v["sparse_initializers"] and not dense_v["sparse_initializers"]
    assert sparse_v["bytes"] < dense_v["bytes"] == pytest.approx(read_manifest(dense)["variants"][0]["bytes"], rel=0.01)
    assert sparse_v["nonzeros"] == dense_v["nonzeros"]
    assert manifest["validation"]["sparse_initializers"]["max_abs_vs_dense"] <= 1e-5
    assert manifest["files_by_role"] == {"onnxruntime": "model.onnx", "deepsparse": DENSE_FILE}
    dense_model = onnx.load(str(out / DENSE_FILE))
    assert not dense_model.graph.sparse_initializer and dense_model.ir_version <= 9
    # ORT densifies at load: same outputs as the dense file.
    feeds = {"input_ids": np.array([[2, 10, 11, 12, 3]]), "attention_mask": np.ones((1, 5), np.int64),
             "token_type_ids": np.zeros((1, 5), np.int64)}
    a = run_session(ort_session(out / "model.onnx"), feeds)["last_hidden_state"]
    b = run_session(ort_session(out / DENSE_FILE), feeds)["last_hidden_state"]
    assert np.array_equal(a, b)


def test_sparse_auto_skips_dense_weights(tiny_models, tmp_path):
    out = export(str(tiny_models("bert")), tmp_path / "e", ExportConfig(sparse_initializers="auto"), progress=False)
    assert not read_manifest(out)["variants"][0]["sparse_initializers"]


def test_reexport_from_export_dir_quantizes_against_source(tiny_models, tmp_path):
    first = export(str(tiny_models("bert")), tmp_path / "fp32", progress=False)
    out = export(str(first), tmp_path / "int8", ExportConfig(quantize="int8-dynamic"), progress=False)
    manifest = read_manifest(out)
    assert manifest["source_kind"] == "onnx" and manifest["parent"]["stage"] == "export"
    assert manifest["validation"]["int8"]["passed"] and (out / "tokenizer.json").is_file()


@pytest.mark.slow
@pytest.mark.skipif(deepsparse_python() is None,
                    reason="no DeepSparse environment (edgeprune runtime install deepsparse)")
def test_deepsparse_compiles_target(tiny_models, tmp_path):
    out = export(str(tiny_models("bert")), tmp_path / "e", ExportConfig(target="deepsparse"), progress=False)
    report = read_manifest(out)["validation"]["deepsparse"]
    assert report["checked"] and report["max_abs_vs_onnxruntime"] < 1e-3


# --- bad input: one clear error, nothing half-written ------------------------------------------------------------
def _assert_clean_failure(capsys, tmp_path, argv, expected):
    from edgeprune.cli import main

    before = set(tmp_path.iterdir())
    assert main(argv) == 2
    err = [line for line in capsys.readouterr().err.strip().splitlines() if not line.startswith("[export]")]
    assert len(err) == 1 and err[0].startswith("edgeprune: error:") and expected in err[0], err
    assert set(tmp_path.iterdir()) == before  # no output dir, no temp dir left behind


def _loose_copy(export_dir, directory):
    """The export's files without its manifest: an ONNX directory no hash check stands in front of."""
    import shutil

    directory.mkdir()
    for item in export_dir.iterdir():
        if item.name != "manifest.json":
            shutil.copy2(item, directory / item.name)
    return directory


def test_corrupt_and_truncated_onnx(tiny_models, tmp_path, capsys):
    good = export(str(tiny_models("bert")), tmp_path / "good", progress=False)
    loose = _loose_copy(good, tmp_path / "loose")
    data = (good / "model.onnx").read_bytes()
    (good / "model.onnx").write_bytes(data[: len(data) // 2])
    # an export directory: its manifest's SHA-256 catches the damage first (issue 13, item 25)
    _assert_clean_failure(capsys, tmp_path, ["export", str(good), "-o", str(tmp_path / "o0")], "model.onnx: SHA-256")
    (loose / "model.onnx").write_bytes(data[: len(data) // 2])
    _assert_clean_failure(capsys, tmp_path, ["export", str(loose / "model.onnx"), "-o", str(tmp_path / "o1")], "corrupt or truncated")
    (loose / "model.onnx").write_bytes(b"\x00garbage" * 100)
    _assert_clean_failure(capsys, tmp_path, ["export", str(loose / "model.onnx"), "-o", str(tmp_path / "o2")], "ONNX")


def test_unsupported_opset_for_target(tiny_models, tmp_path, capsys):
    _assert_clean_failure(capsys, tmp_path, ["export", str(tiny_models("bert")), "-o", str(tmp_path / "o"),
                                             "--target", "deepsparse", "--opset", "19"], "opset <= 17")


def test_source_ir_too_new_for_deepsparse_is_lowered_or_refused(tiny_models, tmp_path, capsys):
    good = _loose_copy(export(str(tiny_models("bert")), tmp_path / "export", progress=False), tmp_path / "good")
    model = onnx.load(str(good / "model.onnx"))
    model.opset_import[0].version = 21  # claims an opset DeepSparse cannot run
    onnx.save(model, str(good / "model.onnx"))
    _assert_clean_failure(capsys, tmp_path, ["export", str(good / "model.onnx"), "-o", str(tmp_path / "o"),
                                             "--target", "deepsparse"], "opset 21 > 17")


def test_static_quantization_needs_calibration(tiny_models, tmp_path, capsys):
    _assert_clean_failure(capsys, tmp_path, ["export", str(tiny_models("bert")), "-o", str(tmp_path / "o"),
                                             "--quantize", "int8-static"], "--calib")
    _assert_clean_failure(capsys, tmp_path, ["export", str(tiny_models("bert")), "-o", str(tmp_path / "o"),
                                             "--quantize", "int8-static", "--calib", str(tmp_path / "missing.txt")],
                          "not found")


def test_existing_output_dir(tiny_models, tmp_path, capsys):
    (tmp_path / "o").mkdir()
    (tmp_path / "o" / "keep.txt").write_text("mine")
    _assert_clean_failure(capsys, tmp_path, ["export", str(tiny_models("bert")), "-o", str(tmp_path / "o")],
                          "--overwrite")
    assert (tmp_path / "o" / "keep.txt").read_text() == "mine"


def test_cli_json_and_config_roundtrip(tiny_models, tmp_path, capsys):
    from edgeprune.cli import main

    cfg = tmp_path / "export.yaml"
    cfg.write_text(ExportConfig(quantize="int8-dynamic").to_yaml())
    assert main(["export", str(tiny_models("bert")), "-o", str(tmp_path / "o"), "--config", str(cfg), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["variants"][0]["quantization"] == "int8-dynamic"
    assert ExportConfig.from_dict(read_manifest(tmp_path / "o")["config"]) == ExportConfig(quantize="int8-dynamic")


def test_config_refusals():
    with pytest.raises(Exception, match="--optimize"):
        ExportConfig(target="deepsparse", optimize=True)
    with pytest.raises(Exception, match="--calib"):
        ExportConfig(quantize="int8-static")
    with pytest.raises(Exception, match="sparse-initializers"):
        ExportConfig(sparse_initializers="maybe")


def test_sparse_break_even():
    """fp32 with INT64 indices pays below 1/3 non-zeros; INT8 only below 1/9."""
    from edgeprune.exporters.sparse import should_sparsify

    def tensor(dtype, zeros):
        a = np.ones(3000, dtype=dtype)
        a[:zeros] = 0
        return a

    assert should_sparsify(tensor(np.float32, 2100), "on") and not should_sparsify(tensor(np.float32, 1900), "on")
    assert not should_sparsify(tensor(np.int8, 2600), "on") and should_sparsify(tensor(np.int8, 2700), "on")
    assert not should_sparsify(tensor(np.float32, 2050), "auto")  # saves 5 %, below the 10 % bar
    assert should_sparsify(tensor(np.float32, 2700), "auto") and not should_sparsify(tensor(np.float32, 2700), "off")


def test_decoder_gate_bounds_are_the_users_where_given_else_the_formats():
    """--max-ppl-ratio / --min-greedy-agreement reach every decoder gate (the GGUF one ignored them before)."""
    from edgeprune.exporters.decoder_gate import gate_bounds
    from edgeprune.exporters.gguf_api import GATE

    assert gate_bounds(ExportConfig(), GATE["q4_0"]) == GATE["q4_0"]
    assert gate_bounds(ExportConfig(max_ppl_ratio=1.5), GATE["q4_0"]) == (1.5, GATE["q4_0"][1])
    assert gate_bounds(ExportConfig(min_greedy_agreement=0.0), (1.05, 0.75)) == (1.05, 0.0)
    with pytest.raises(EdgePruneError, match="max_ppl_ratio must be >= 1"):
        ExportConfig(max_ppl_ratio=0.5)


def test_int4_weight_without_calibration_text_falls_back_to_hqq(tmp_path, monkeypatch, capsys):
    """auto = GPTQ needs calibration text; when the default one is unreachable the check before any work
    switches to HQQ in one line, and an explicit --weight-algorithm gptq is one clear error instead."""
    from edgeprune.exporters.api import _resolve_gptq_data

    monkeypatch.setenv("EDGEPRUNE_DATA", str(tmp_path / "no-mirror"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    resolved = _resolve_gptq_data(ExportConfig(quantize="int4-weight"))
    assert resolved.weight_algorithm == "hqq"
    assert "int4-weight uses HQQ, not GPTQ" in capsys.readouterr().err
    with pytest.raises(EdgePruneError, match="--weight-algorithm gptq needs calibration text"):
        _resolve_gptq_data(ExportConfig(quantize="int4-weight", weight_algorithm="gptq"))
    calib = tmp_path / "calib.txt"
    calib.write_text("some calibration text for the windows\n")
    assert _resolve_gptq_data(ExportConfig(quantize="int4-weight", calib=str(calib))).weight_algorithm == "auto"
