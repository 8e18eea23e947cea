"""Quantization with onnxruntime: INT8 dynamic (weights offline, activations at run time), INT8 static QDQ
(activation ranges calibrated on real text), and weight-only INT4/INT8 (``MatMulNBits``: blockwise integer
weights, fp32 activations)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.logs import quiet_logs
from edgeprune.core.onnxio import drop_unused_initializers

MODES = ("none", "int8-dynamic", "int8-static", "int4-weight", "int8-weight")
WEIGHT_ONLY_BITS = {"int4-weight": 4, "int8-weight": 8}
WEIGHT_ALGORITHMS = ("rtn", "hqq", "gptq")
# Gather: the embedding tables hold a third or more of a small encoder's weights; INT8 there shrinks the file
# (MiniLM: 47 MB of 90 MB) at no measurable quality cost.
# Attention: the fused operator of `--optimize` (its q/k/v weights become QAttention; fused + QAttention ran
# 1.13x faster than the unfused INT8 MiniLM-60, benchmarks/RESULTS.md); absent from unfused graphs.
DYNAMIC_OPS = ("MatMul", "Gemm", "Gather", "Attention")
STATIC_OPS = ("MatMul", "Gather")


def _extra_options(**more) -> dict[str, Any]:
    import onnx

    # Pruned graphs leave some tensors without inferred types; ORT 1.32's quantizer then needs a default.
    return {"DefaultTensorType": onnx.TensorProto.FLOAT, **more}


# The quantizer logs per-node warnings through its own logger and the root logger; quiet both, per call only.
_quiet = quiet_logs("", "onnxruntime.quantization")


@_quiet
def quantize_dynamic(src: Path, dst: Path, per_channel: bool) -> dict[str, Any]:
    """INT8 weights for MatMul/Gemm (per output channel when asked), activations quantized on the fly."""
    from onnxruntime.quantization import QuantType, quantize_dynamic as ort_quantize_dynamic

    from edgeprune.core.onnxio import is_external

    try:
        ort_quantize_dynamic(str(src), str(dst), op_types_to_quantize=DYNAMIC_OPS, per_channel=per_channel,
                             weight_type=QuantType.QInt8, extra_options=_extra_options(),
                             use_external_data_format=is_external(src))
    except Exception as exc:
        raise EdgePruneError(f"dynamic quantization failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return {"method": "int8-dynamic", "per_channel": per_channel, "weight_type": "int8", "ops": list(DYNAMIC_OPS)}


class _FeedReader:
    """onnxruntime CalibrationDataReader over pre-built feed batches."""

    def __init__(self, batches: Iterable[dict]):
        self._batches = list(batches)
        self._iter = iter(self._batches)

    def get_next(self):
        return next(self._iter, None)

    def rewind(self):
        self._iter = iter(self._batches)


def weight_nodes(path: Path, op_types: Iterable[str], skip_gated: bool = False) -> tuple[list[str], list[str]]:
    """Nodes of ``op_types`` that read a constant weight (Linear layers, embedding tables), split into
    (to quantize, skipped). With ``skip_gated``, nodes whose activation input is an activation x activation
    ``Mul`` are skipped: the last op of GELU (x * Phi(x)) and of SwiGLU (silu(gate) * up), i.e. the FFN down
    projection. Norm scaling (weight * x) multiplies by a constant and is not matched."""
    import numpy as np
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    constants = {t.name for t in model.graph.initializer} | {t.values.name for t in model.graph.sparse_initializer}
    constants |= {o for n in model.graph.node if n.op_type == "Constant" for o in n.output}
    producer = {o: n for n in model.graph.node for o in n.output}
    scalars = {t.name for t in model.graph.initializer if int(np.prod(t.dims)) == 1}
    scalars |= {n.output[0] for n in model.graph.node if n.op_type == "Constant"
                and all(int(np.prod(a.t.dims)) == 1 for a in n.attribute if a.name == "value")}

    def gated(name: str, depth: int = 0) -> bool:
        node = producer.get(name)
        if node is None or node.op_type != "Mul":
            return False
        const = [i for i in node.input if i in constants]
        if not const:
            return True
        # Look through a scalar scale (GELU's 0.5 * ...); a norm's weight vector stops the search.
        if depth < 2 and len(const) == 1 and const[0] in scalars:
            return any(gated(i, depth + 1) for i in node.input if i not in constants)
        return False

    keep, skipped = [], []
    for node in model.graph.node:
        if node.op_type not in op_types or not any(i in constants for i in node.input):
            continue
        activations = [i for i in node.input if i not in constants]
        (skipped if skip_gated and any(gated(i) for i in activations) else keep).append(node.name)
    return keep, skipped


@_quiet
def quantize_static(src: Path, dst: Path, batches: list[dict], per_channel: bool) -> dict[str, Any]:
    """QDQ INT8 with MinMax activation ranges from calibration batches.

    Only weight MatMuls (and embedding Gathers) are quantized. Two kinds of MatMul stay fp32 because one static
    range cannot cover their inputs (measured on pruned MiniLM, mean cosine against fp32 in docs/export.md:
    0.88 quantizing all MatMuls, 0.95 weight MatMuls only, 0.99 also skipping FFN down projections):
    attention's activation x activation products, and FFN down projections, whose input is the heavy-tailed
    output of the GELU / gated activation (an activation x activation Mul in every supported family's graph).
    Activations are asymmetric uint8, weights symmetric int8.
    """
    from onnxruntime.quantization import CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType
    from onnxruntime.quantization import quantize_static as ort_quantize_static

    from edgeprune.core.onnxio import is_external

    if not batches:
        raise EdgePruneError("int8-static needs calibration data (--calib)")
    reader = type("EdgePruneCalibReader", (_FeedReader, CalibrationDataReader), {})(batches)
    nodes, skipped = weight_nodes(src, STATIC_OPS, skip_gated=True)
    if not nodes:
        raise EdgePruneError("int8-static: no weight MatMul/Gather nodes to quantize")
    try:
        ort_quantize_static(
            str(src), str(dst), reader, quant_format=QuantFormat.QDQ, op_types_to_quantize=list(STATIC_OPS),
            nodes_to_quantize=nodes, per_channel=per_channel, activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
            extra_options=_extra_options(ActivationSymmetric=False, WeightSymmetric=True),
            use_external_data_format=is_external(src))
    except EdgePruneError:
        raise
    except Exception as exc:
        raise EdgePruneError(f"static quantization failed: {exc.__class__.__name__}: {str(exc).splitlines()[0]}") from None
    return {"method": "int8-static", "format": "QDQ", "per_channel": per_channel, "calibration_batches": len(batches),
            "calibration_samples": int(sum(b["input_ids"].shape[0] for b in batches)), "ops": list(STATIC_OPS),
            "quantized_nodes": len(nodes), "fp32_weight_nodes": len(skipped), "activations": "uint8 asymmetric", "weights": "int8 symmetric"}


def fold_transposed_weights(model) -> list[str]:
    """Replace ``MatMul(x, Transpose(W))`` with a MatMul on a transposed copy of the constant ``W`` (in place).

    A tied LM head is exported as ``Transpose`` of the embedding table, which ORT's weight-only quantizer skips
    (it quantizes constant MatMul inputs only): SmolLM2's LM head, a quarter of its per-token multiply-adds,
    would stay fp32. Returns the MatMul nodes rewired."""
    from onnx import numpy_helper

    initializers = {t.name: t for t in model.graph.initializer}
    producer = {o: n for n in model.graph.node for o in n.output}
    added: dict[str, str] = {}
    rewired = []
    for node in model.graph.node:
        if node.op_type != "MatMul" or len(node.input) < 2:
            continue
        transpose = producer.get(node.input[1])
        if transpose is None or transpose.op_type != "Transpose" or transpose.input[0] not in initializers:
            continue
        source = initializers[transpose.input[0]]
        perm = next((list(a.ints) for a in transpose.attribute if a.name == "perm"), None)
        if len(source.dims) != 2 or perm not in (None, [1, 0]):
            continue
        if source.name not in added:
            copy = numpy_helper.from_array(numpy_helper.to_array(source).T.copy(), f"{source.name}_transposed_const")
            model.graph.initializer.append(copy)
            added[source.name] = copy.name
        node.input[1] = added[source.name]
        rewired.append(node.name)
    if rewired:  # drop Transposes nobody reads any more
        used = {i for n in model.graph.node for i in n.input} | {o.name for o in model.graph.output}
        dead = [n for n in model.graph.node if n.op_type == "Transpose" and not any(o in used for o in n.output)]
        for n in dead:
            model.graph.node.remove(n)
    return rewired


@dataclass(frozen=True)
class WeightOnlySpec:
    """How ``quantize_weight_only`` quantizes: ``bits`` for the block MatMuls, ``head_bits`` for the LM head
    (the MatMul producing ``logits``; 0 keeps it fp32), ``algorithm`` rtn or hqq, and the rest as documented
    there. No defaults: an export resolves them from its config (``exporters.api._weight_only_spec``)."""

    bits: int
    block_size: int
    symmetric: bool
    accuracy_level: int
    embedding_bits: int  # 0: the embedding tables stay fp32
    algorithm: str
    head_bits: int


def _quantize_matmuls(model, spec: WeightOnlySpec, bits: int, include: list[str] | None = None,
                      exclude: Sequence[str] = ()):
    """``model`` with its constant-weight MatMuls (``include`` only, when given; never ``exclude``) as
    ``bits``-bit MatMulNBits by the spec's algorithm, at the spec's compute precision (HQQ's nodes leave it
    unset, so it is set here)."""
    from onnx import helper
    from onnxruntime.quantization.matmul_nbits_quantizer import HQQWeightOnlyQuantConfig, MatMulNBitsQuantizer

    # HQQ's float zero points load in onnxruntime 1.32's CPU MatMulNBits at 4 bits only, so 8 bits is RTN
    hqq = HQQWeightOnlyQuantConfig(block_size=spec.block_size, bits=bits, op_types_to_quantize=("MatMul",),
                                   quant_axes=(("MatMul", 0),)) if spec.algorithm == "hqq" and bits == 4 else None
    quantizer = MatMulNBitsQuantizer(model, bits=bits, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                     accuracy_level=spec.accuracy_level, op_types_to_quantize=("MatMul",),
                                     quant_axes=(("MatMul", 0),), nodes_to_include=include,
                                     nodes_to_exclude=list(exclude), algo_config=hqq)
    quantizer.process()
    quantized = quantizer.model.model
    if hqq is not None and spec.accuracy_level:
        for node in quantized.graph.node:
            if node.op_type == "MatMulNBits" and not any(a.name == "accuracy_level" for a in node.attribute):
                node.attribute.append(helper.make_attribute("accuracy_level", int(spec.accuracy_level)))
    return quantized


def _gptq_matmuls(model, spec: WeightOnlySpec, calibration: list[dict], exclude: Sequence[str] = ()) -> dict:
    """Replace, in place, every MatMul with a constant 2-D weight (never ``exclude``) by a ``spec.bits``-bit
    MatMulNBits (4 bits: float zero points, for ``symmetric_zero_points`` to rewrite; 8 bits: symmetric) whose
    codes GPTQ chose from the Hessians of its input over ``calibration`` (feeds of the fp32 graph); returns
    what the manifest records."""
    import onnx
    from onnx import helper, numpy_helper

    import numpy as np

    from edgeprune.core.onnxio import session_for_model
    from edgeprune.exporters import gptq

    inits = {i.name: i for i in model.graph.initializer}
    targets = [node for node in model.graph.node
               if node.op_type == "MatMul" and node.name not in set(exclude) and node.input[1] in inits
               and len(inits[node.input[1]].dims) == 2]
    if not targets:
        return {"nodes": 0}
    inputs = sorted({node.input[0] for node in targets})
    augmented = onnx.ModelProto()
    augmented.CopyFrom(model)
    known = {o.name for o in augmented.graph.output}
    augmented.graph.output.extend(onnx.ValueInfoProto(name=name) for name in inputs if name not in known)
    with tempfile.TemporaryDirectory(prefix="edgeprune-gptq-") as scratch:  # used only for graphs over 2 GB
        session = session_for_model(augmented, scratch)
    del augmented
    masks = [feeds["attention_mask"] if "attention_mask" in feeds else np.ones(feeds["input_ids"].shape)
             for feeds in calibration]
    hessians, tokens = gptq.accumulate_hessians(session, _progress(calibration, "GPTQ calibration", "batch"),
                                                inputs, masks)
    del session
    # float zero points at 4 bits: on the 25 % pruned SmolLM2 (a dequantized Q4_1 source) integer ones scored
    # ratio 1.097 against 1.018 (docs/export.md); 8 bits symmetric, the form ORT 1.32's CPU kernel loads
    settings = gptq.GPTQSettings(block_size=spec.block_size, bits=spec.bits,
                                 zero_point="float" if spec.bits == 4 else "none")
    replaced = 0
    for node in _progress(targets, "GPTQ", "matmul"):
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        k, n = weight.shape
        codes, scales, zeros = gptq.gptq_quantize(weight, hessians[node.input[0]], settings)
        base = f"{node.input[1]}_gptq{spec.bits}"
        names = [node.input[0], base, f"{base}_scales"]
        model.graph.initializer.extend([numpy_helper.from_array(gptq.pack_codes(codes, spec.block_size, spec.bits), base),
                                        numpy_helper.from_array(scales, f"{base}_scales")])
        if settings.zero_point != "none":
            stored = gptq.pack_zero_points(zeros) if settings.zero_point == "integer" else zeros
            model.graph.initializer.append(numpy_helper.from_array(stored, f"{base}_zeros"))
            names.append(f"{base}_zeros")
        attrs = {"K": k, "N": n, "bits": spec.bits, "block_size": spec.block_size}
        if spec.accuracy_level:
            attrs["accuracy_level"] = int(spec.accuracy_level)
        node.CopyFrom(helper.make_node("MatMulNBits", names, list(node.output), name=f"{node.name}_Q{spec.bits}",
                                       domain="com.microsoft", **attrs))
        replaced += 1
    drop_unused_initializers(model.graph)
    if not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    return {"nodes": replaced, "calibration_tokens": tokens, "damp": settings.damp, "zero_point": settings.zero_point,
            "clip_search": settings.clip_search, "act_order": settings.act_order}


def _gathers_to_8bit(model, block_size: int) -> None:
    """Replace, in place, every Gather of a constant 2-D table along axis 0 (an embedding) by an 8-bit
    ``GatherBlockQuantized``: symmetric round-to-nearest blocks of ``block_size`` along each row, uint8 codes
    around the operator's implied zero point 128 (onnxruntime 1.32's quantizer writes only 4-bit tables)."""
    from onnx import helper, numpy_helper

    import numpy as np

    inits = {i.name: i for i in model.graph.initializer}
    done: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:
        axis = next((helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 0)
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        if table is None or len(table.dims) != 2 or axis != 0 or table.dims[1] % block_size:
            continue
        if table.name not in done:
            values = numpy_helper.to_array(table).astype(np.float32)
            rows, width = values.shape
            blocks = values.reshape(rows, width // block_size, block_size)
            scales = np.abs(blocks).max(axis=2) / 127.0
            scales = np.where(scales == 0, 1.0, scales).astype(np.float32)
            codes = (np.clip(np.rint(blocks / scales[..., None]), -127, 127) + 128).astype(np.uint8).reshape(rows, width)
            names = (f"{table.name}_Q8", f"{table.name}_Q8_scales")
            model.graph.initializer.extend([numpy_helper.from_array(codes, names[0]),
                                            numpy_helper.from_array(scales, names[1])])
            done[table.name] = names
        codes_name, scales_name = done[table.name]
        node.CopyFrom(helper.make_node("GatherBlockQuantized", [codes_name, node.input[1], scales_name],
                                       list(node.output), name=f"{node.name}_Q8", domain="com.microsoft",
                                       gather_axis=0, quantize_axis=1, block_size=block_size, bits=8))
    drop_unused_initializers(model.graph)


def _progress(items, label: str, unit: str):
    from tqdm import tqdm

    return tqdm(items, desc=label, unit=unit, leave=False)


def symmetric_zero_points(model) -> int:
    """Rewrite, in place, every 4-bit MatMulNBits with float zero points (HQQ's, GPTQ's) into the symmetric form
    that onnxruntime's fast CPU kernel runs, plus an exact fp32 correction: s·(q − z) = s·(q − 8) + s·(8 − z),
    and the second term is constant over each block of K, so ``X·W = MatMulNBits_sym(X) + (per-block sums of
    X)·C`` with ``C[block, n] = s·(8 − z)`` (K / block_size rows). The block sums are computed once per input
    tensor (q/k/v share theirs, and gate/up), so each node adds only a small MatMul and an Add. Measured: float
    zero points run 0.25x fp32 decode in onnxruntime 1.32 (docs/export.md). Returns the number of nodes
    rewritten."""
    from onnx import TensorProto, helper, numpy_helper

    import numpy as np

    inits = {i.name: i for i in model.graph.initializer}
    rewritten, nodes, sums_of = 0, [], {}
    for node in model.graph.node:
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        zero = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zero is None or zero.data_type != TensorProto.FLOAT or attrs.get("bits") != 4 or len(node.input) > 4:
            nodes.append(node)
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        blocks = -(-k // block)  # a last partial block (a pruned width) is zero-padded, as in the packed weights
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        zeros = numpy_helper.to_array(zero).reshape(n, blocks)
        key = (node.input[0], k, block)
        if key not in sums_of:
            sums_of[key], shared = _block_sums(model, node.input[0], k, block, len(sums_of))
            nodes += shared
        base = node.output[0]
        correction = np.ascontiguousarray((scales * (8.0 - zeros)).T.astype(np.float32))  # [blocks, N]
        model.graph.initializer.append(numpy_helper.from_array(correction, f"{base}__zp_correction"))
        nodes += [helper.make_node("MatMulNBits", list(node.input[:3]), [f"{base}__sym"], name=node.name,
                                   domain=node.domain, **attrs),
                  helper.make_node("MatMul", [sums_of[key], f"{base}__zp_correction"], [f"{base}__zp_add"]),
                  helper.make_node("Add", [f"{base}__sym", f"{base}__zp_add"], [base])]
        rewritten += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    drop_unused_initializers(model.graph)
    return rewritten


def _block_sums(model, x: str, k: int, block: int, index: int) -> tuple[str, list]:
    """Nodes computing the sums of ``x`` [..., K] over each block of ``block`` along K (zero-padded to whole
    blocks), shaped [..., blocks]; and the name of that tensor."""
    from onnx import helper, numpy_helper

    import numpy as np

    blocks = -(-k // block)
    p = f"/zero_point_sums_{index}"
    consts = {f"{p}/rows": [-1, k], f"{p}/pad": [0, 0, 0, blocks * block - k], f"{p}/blocks": [-1, blocks, block],
              f"{p}/axis": [2], f"{p}/width": [blocks]}
    model.graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), name) for name, v in consts.items())
    nodes = [helper.make_node("Reshape", [x, f"{p}/rows"], [f"{p}/x_rows"])]
    if blocks * block != k:
        nodes.append(helper.make_node("Pad", [f"{p}/x_rows", f"{p}/pad"], [f"{p}/x_padded"]))
    nodes += [helper.make_node("Reshape", [nodes[-1].output[0], f"{p}/blocks"], [f"{p}/x_blocks"]),
              helper.make_node("ReduceSum", [f"{p}/x_blocks", f"{p}/axis"], [f"{p}/flat"], keepdims=0),
              helper.make_node("Shape", [x], [f"{p}/lead"], end=-1),
              helper.make_node("Concat", [f"{p}/lead", f"{p}/width"], [f"{p}/shape"], axis=0),
              helper.make_node("Reshape", [f"{p}/flat", f"{p}/shape"], [f"{p}/sums"])]
    return f"{p}/sums", nodes


def _lm_head_nodes(model) -> list[str]:
    """The MatMul(s) writing the graph's ``logits`` output directly (a decoder's LM head, a classifier's
    head); none for an embedding model."""
    outputs = {o.name for o in model.graph.output if o.name == "logits"}
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and set(n.output) & outputs]


def _embedding_note(has_gathers: bool, gather_bits: int, requested_bits: int, source_opset: int) -> str:
    if not has_gathers:
        return "no embedding Gather in the graph"
    if gather_bits:
        return f"GatherBlockQuantized int{gather_bits}"
    if not requested_bits:
        return "fp32 (not requested)"
    return f"fp32 (opset {source_opset} could not be converted to 21, which the int4 type needs)"


@_quiet
def quantize_weight_only(src: Path, dst: Path, spec: WeightOnlySpec,
                         calibration: list[dict] | None = None) -> dict[str, Any]:
    """Blockwise weight-only quantization with onnxruntime's ``MatMulNBitsQuantizer``: every MatMul with a
    constant weight becomes ``MatMulNBits`` (``block_size`` weights along K share one fp32 scale, and a zero
    point when asymmetric); activations stay fp32. The LM head gets ``head_bits`` (measured on SmolLM2-135M: the
    int4 LM head is where int4 loses its perplexity, docs/export.md). The embedding Gathers become
    ``GatherBlockQuantized`` with ``embedding_bits``: 8 written here (onnxruntime's quantizer has a 4-bit path
    only), 4 through that quantizer, which needs opset 21 for the int4 tensor type, so an older graph is
    converted with onnx's version converter first (relabelling alone would be wrong: Reduce*/Split changed).
    ``accuracy_level``: the lowest precision MatMulNBits may compute in (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8
    activations). ``algorithm``: ``rtn`` (round to nearest, symmetric or not) or ``hqq`` (Half-Quadratic
    Quantization: per-block scale and float zero point fitted to each block's weights, no calibration data;
    MatMuls only, since onnxruntime's GatherBlockQuantized takes no float zero points, so the embedding table
    then goes through RTN); ``gptq`` (error-compensated rounding from the Hessians of each MatMul's input over
    ``calibration``, feeds of the source graph; symmetric, like RTN's fast form)."""
    import onnx
    import onnx.version_converter
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    from edgeprune.core.onnxio import opset_of, save_onnx

    bits = spec.bits
    model = onnx.load(str(src))
    tied = fold_transposed_weights(model)
    gathers, _ = weight_nodes(src, ("Gather",))
    source_opset, converted = opset_of(model), False
    gather_bits = spec.embedding_bits if gathers else 0
    if gather_bits == 4 and source_opset < 21:
        try:  # the int4 tensor type needs opset 21; convert properly (Reduce*/Split changed since 17)
            model = onnx.version_converter.convert_version(model, 21)
            onnx.checker.check_model(model)  # over 2 GB this raises: the table stays fp32
            converted = True
        except Exception:  # noqa: BLE001 - keep the source opset and the embedding table fp32
            model = onnx.load(str(src))
            fold_transposed_weights(model)
            gather_bits = 0
    head = _lm_head_nodes(model) if spec.head_bits != bits else []
    try:
        if spec.algorithm == "gptq":
            if not calibration:
                raise EdgePruneError("GPTQ needs calibration feeds")
            gptq_record = _gptq_matmuls(model, spec, calibration, exclude=head)
        else:
            model, gptq_record = _quantize_matmuls(model, spec, bits, exclude=head), None
        if head and spec.head_bits:
            model = _quantize_matmuls(model, spec, spec.head_bits, include=head)
        fast_zero_points = symmetric_zero_points(model) if spec.algorithm in ("hqq", "gptq") else 0
        if gather_bits == 8:
            _gathers_to_8bit(model, spec.block_size)
        elif gather_bits == 4:  # RTN for every algorithm (see above)
            quantizer = MatMulNBitsQuantizer(model, bits=4, block_size=spec.block_size, is_symmetric=spec.symmetric,
                                             op_types_to_quantize=("Gather",), quant_axes=(("Gather", 1),))
            quantizer.process()
            model = quantizer.model.model
        save_onnx(model, dst)
    except EdgePruneError:
        raise
    except Exception as exc:
        raise EdgePruneError(f"weight-only quantization failed: {exc.__class__.__name__}: "
                             f"{str(exc).splitlines()[0] if str(exc) else ''}") from None
    out = onnx.load(str(dst), load_external_data=False)
    counts: dict[str, int] = {}
    for node in out.graph.node:
        if node.op_type in ("MatMulNBits", "GatherBlockQuantized", "MatMul", "Gather"):
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
    if not counts.get("MatMulNBits"):
        raise EdgePruneError("weight-only quantization: no MatMul with a constant weight was quantized")
    embedding_note = _embedding_note(bool(gathers), gather_bits, spec.embedding_bits, source_opset)
    return {"method": f"int{bits}-weight", "quantizer": f"onnxruntime MatMulNBitsQuantizer ({spec.algorithm.upper()})",
            "algorithm": spec.algorithm, "bits": bits, "block_size": spec.block_size,
            "symmetric": spec.symmetric if spec.algorithm == "rtn" else None, "accuracy_level": spec.accuracy_level,
            "lm_head": ({"nodes": head, "bits": spec.head_bits or "fp32"} if head else "same as the blocks"),
            "float_zero_points_rewritten": fast_zero_points, "gptq": gptq_record,
            "embeddings": embedding_note, "transposed_weights_folded": tied, "opset": opset_of(out), "converted_from_opset": source_opset if converted else None,
            "nodes": counts}
