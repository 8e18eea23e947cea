"""Tiny hand-built ONNX models for the benchmark harness: an encoder (embedding -> FFN) of any width and a
one-layer decoder with a real KV cache (past ++ new keys/values), each in an export-like directory."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

VOCAB, HIDDEN = 50, 16


def _save(model, directory: Path, config: dict) -> Path:
    import onnx

    directory.mkdir(parents=True, exist_ok=True)
    onnx.checker.check_model(model)
    onnx.save(model, str(directory / "model.onnx"))
    (directory / "config.json").write_text(json.dumps(config))
    return directory


def make_encoder(directory: Path, ffn: int, seed: int = 0, noise: float = 0.0) -> Path:
    """last_hidden_state = emb + relu(emb @ W1) @ W2; ``ffn`` sets the work per token. ``noise`` perturbs the
    weights of a copy so it is a 'candidate' that agrees only approximately with the reference."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    w1 = (rng.standard_normal((HIDDEN, ffn)) / np.sqrt(HIDDEN)).astype(np.float32)
    w2 = (rng.standard_normal((ffn, HIDDEN)) / np.sqrt(ffn)).astype(np.float32)
    if noise:
        w2 = w2 + noise * rng.standard_normal(w2.shape).astype(np.float32)
    nodes = [
        helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT),
        helper.make_node("Unsqueeze", ["maskf", "axis2"], ["mask3"]),
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node("Relu", ["h"], ["a"]),
        helper.make_node("MatMul", ["a", "w2"], ["y"]),
        helper.make_node("Add", ["x", "y"], ["z"]),
        helper.make_node("Mul", ["z", "mask3"], ["last_hidden_state"]),
    ]
    graph = helper.make_graph(
        nodes, "tiny_encoder",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "seq"])],
        [helper.make_tensor_value_info("last_hidden_state", TensorProto.FLOAT, ["batch", "seq", HIDDEN])],
        [numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
         numpy_helper.from_array(np.array([2], dtype=np.int64), "axis2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(model, directory, {"vocab_size": VOCAB, "model_type": "tiny"})


def make_decoder(directory: Path, kv_heads: int = 2, head_dim: int = 4, seed: int = 0) -> Path:
    """One attention-free layer whose KV cache grows: present.0.key = concat(past, new, axis=2)."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    emb = rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32)
    wk = rng.standard_normal((HIDDEN, kv_heads * head_dim)).astype(np.float32)
    wo = rng.standard_normal((HIDDEN, VOCAB)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["x"]),
             helper.make_node("MatMul", ["x", "wk"], ["k2"]),
             helper.make_node("Reshape", ["k2", "kshape"], ["k4"]),
             helper.make_node("Transpose", ["k4"], ["knew"], perm=[0, 2, 1, 3]),
             helper.make_node("MatMul", ["x", "wo"], ["logits"])]
    inputs = [helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
              helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch", "total"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", "seq", VOCAB])]
    for kind in ("key", "value"):
        past, present = f"past_key_values.0.{kind}", f"present.0.{kind}"
        inputs.append(helper.make_tensor_value_info(past, TensorProto.FLOAT, ["batch", kv_heads, "past", head_dim]))
        outputs.append(helper.make_tensor_value_info(present, TensorProto.FLOAT, ["batch", kv_heads, "total", head_dim]))
        nodes.append(helper.make_node("Concat", [past, "knew"], [present], axis=2))
    # attention_mask must be consumed for ORT to accept it as an input; fold it into a no-op sum.
    nodes += [helper.make_node("ReduceSum", ["attention_mask"], ["mask_sum"], keepdims=0)]
    outputs.append(helper.make_tensor_value_info("mask_sum", TensorProto.INT64, ["batch"]))
    graph = helper.make_graph(nodes, "tiny_decoder", inputs, outputs, [
        numpy_helper.from_array(emb, "emb"), numpy_helper.from_array(wk, "wk"), numpy_helper.from_array(wo, "wo"),
        numpy_helper.from_array(np.array([0, 0, kv_heads, head_dim], dtype=np.int64), "kshape")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return _save(model, directory, {"vocab_size": VOCAB, "model_type": "tiny"})


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench-onnx")
    return {
        "dense": make_encoder(root / "dense", ffn=1024),
        "small": make_encoder(root / "small", ffn=64, noise=0.01),
        "decoder": make_decoder(root / "decoder"),
    }
