"""Split an exported decoder's LM head off its graph, so scoring can run the head only where it is read.

``split_lm_head(model.onnx)`` finds the node that produces ``logits`` as ``MatMul(hidden, W)`` (optionally
``+ b``; ``W`` an initializer, or ``Transpose`` of one, as torch.onnx writes a tied embedding) and returns a
copy of the graph whose output is ``hidden`` (the final hidden states [B, L, H]), without the head, plus
``W`` and ``b`` as numpy arrays. ``hidden @ W + b`` at the positions a task scores equals the export's logits
there. A weight-only quantized head (one ``com.microsoft`` ``MatMulNBits`` node whose weight, scales and zero
points are initializers: ``--quantize int4-weight|int8-weight``) is split the same way, but the head stays an
ONNX graph (``head_model``: ``hidden`` [N, H] -> ``logits`` [N, V], the same node and packed weights), so the
runtime's own kernel computes it on the picked rows and the logits are bit-for-bit the kernel's. Any other head
(an INT8 ``MatMulInteger`` behind a dynamic activation quantizer, a soft-capped or scaled one) gives ``None``,
and callers keep the full-logits graph. Torch-free (onnx + numpy).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

LOGITS = "logits"


@dataclass(frozen=True)
class SplitHead:
    """The export without its LM head (``model``: an onnx ModelProto whose one output is ``hidden``) and
    the head: its float weight [H, V] and bias [V] (or None), or for a quantized head ``head_model``, an onnx
    ModelProto from ``hidden`` [N, H] to ``logits`` [N, V] (``weight`` is then None)."""

    model: object
    hidden: str
    weight: np.ndarray | None
    bias: np.ndarray | None
    head_model: object = None


def _initializer(graph, producers: dict, name: str) -> np.ndarray | None:
    """The constant behind ``name``: an initializer, or a [1, 0] Transpose of one."""
    from onnx import numpy_helper

    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    node = producers.get(name)
    if node is not None and node.op_type == "Transpose":
        perm = next((list(a.ints) for a in node.attribute if a.name == "perm"), [1, 0])
        inner = _initializer(graph, producers, node.input[0])
        if inner is not None and inner.ndim == 2 and perm == [1, 0]:
            return inner.T
    return None


def _names_used(node) -> set[str]:
    """Every tensor a node reads, including the outer-scope names its subgraphs (If/Loop bodies) read."""
    names = set(node.input)
    for attribute in node.attribute:
        graphs = list(attribute.graphs) + ([attribute.g] if attribute.HasField("g") else [])
        for sub in graphs:
            for inner in sub.node:
                names |= _names_used(inner)
    return names


def split_lm_head(model_path: str | os.PathLike) -> SplitHead | None:
    import onnx

    model = onnx.load(str(model_path), load_external_data=True)
    graph = model.graph
    producers = {out: node for node in graph.node for out in node.output}
    head = producers.get(LOGITS)
    if head is None:
        return None
    bias = None
    if head.op_type == "Add":  # MatMul + bias (an untied Linear with bias)
        for matmul_side, bias_side in ((0, 1), (1, 0)):
            inner = producers.get(head.input[matmul_side])
            bias = _initializer(graph, producers, head.input[bias_side])
            if inner is not None and inner.op_type == "MatMul" and bias is not None and bias.ndim == 1:
                head = inner
                break
        else:
            return None
    head_model = None
    if head.op_type == "MatMulNBits" and head.domain == "com.microsoft" and bias is None:
        head_model = _nbits_head_model(model, head)
        if head_model is None:
            return None
        weight = None
    elif head.op_type != "MatMul":
        return None
    else:
        weight = _initializer(graph, producers, head.input[1])
        if weight is None or weight.ndim != 2 or weight.dtype != np.float32:
            return None
    hidden = head.input[0]
    # keep only what the hidden state needs: the head's nodes and weight go
    needed, kept = {hidden}, []
    for node in reversed(graph.node):
        if needed & set(node.output):
            kept.append(node)
            needed |= _names_used(node)
    kept.reverse()
    del graph.node[:]
    graph.node.extend(kept)
    inits = [i for i in graph.initializer if i.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(inits)
    infos = [i for i in graph.value_info if i.name in needed]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    inputs = [i for i in graph.input if i.name in needed]
    del graph.input[:]
    graph.input.extend(inputs)
    del graph.output[:]
    graph.output.append(onnx.helper.make_tensor_value_info(hidden, onnx.TensorProto.FLOAT, None))
    return SplitHead(model, hidden, None if weight is None else np.ascontiguousarray(weight), bias, head_model)


def _nbits_head_model(model, head):
    """A graph of the one ``MatMulNBits`` head node on a 2-D input, with copies of its packed initializers
    (None when an input other than the activation is not an initializer)."""
    import onnx
    from onnx import helper

    graph = model.graph
    by_name = {init.name: init for init in graph.initializer}
    consts = [name for name in head.input[1:] if name]
    if not all(name in by_name for name in consts):
        return None
    n = next((a.i for a in head.attribute if a.name == "N"), None)
    k = next((a.i for a in head.attribute if a.name == "K"), None)
    if not n or not k:
        return None
    inits = []
    for name in consts:
        copy = onnx.TensorProto()
        copy.CopyFrom(by_name[name])
        inits.append(copy)
    node = onnx.NodeProto()
    node.CopyFrom(head)
    del node.output[:]
    node.output.append(LOGITS)
    sub = helper.make_graph(
        [node], "lm_head", [helper.make_tensor_value_info(head.input[0], onnx.TensorProto.FLOAT, ["rows", k])],
        [helper.make_tensor_value_info(LOGITS, onnx.TensorProto.FLOAT, ["rows", n])], inits)
    opsets = [o for o in model.opset_import if o.domain in ("", "ai.onnx", "com.microsoft")]
    out = helper.make_model(sub, opset_imports=opsets, ir_version=model.ir_version)
    # the packed weights may have been external data of the export; make them inline tensors of this graph
    for init in out.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            return None
    return out


def save_split(split: SplitHead, directory: str | os.PathLike) -> Path:
    """Write the headless graph (weights as external data, so models over 2 GB work) into ``directory``."""
    import onnx

    path = Path(directory) / "hidden.onnx"
    onnx.save_model(split.model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location="hidden.onnx.data", size_threshold=1024)
    return path


def load_hidden_session(split: SplitHead, runtime: str, threads: int | None):
    """A runtime session of the headless graph (its files live only while the session loads)."""
    from edgeprune.runtime.pipelines import load_session

    with tempfile.TemporaryDirectory(prefix="edgeprune-hidden-") as tmp:
        return load_session(save_split(split, tmp), runtime, threads)


def load_head_session(split: SplitHead, runtime: str, threads: int | None):
    """A runtime session of a quantized head (``split.head_model``), run on the picked rows only."""
    import onnx

    from edgeprune.runtime.pipelines import load_session

    with tempfile.TemporaryDirectory(prefix="edgeprune-head-") as tmp:
        path = Path(tmp) / "head.onnx"
        onnx.save_model(split.head_model, str(path))
        return load_session(path, runtime, threads)
