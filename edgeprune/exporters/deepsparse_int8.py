"""INT8 for DeepSparse 1.8: onnxruntime's static QDQ graph rewritten into the integer form SparseML exports
for DeepSparse (``sparseml.exporters.onnx_to_deepsparse``: ``MatMulAddToMatMulIntegerAddCastMul``,
``InitializersToUint8``).

Every weight MatMul ``MatMul(DequantizeLinear(QuantizeLinear(x)), DequantizeLinear(W_int8))`` becomes

    QuantizeLinear(x) -> MatMulInteger(x_q, W_uint8, x_zero_point, 128) -> Cast(float) -> Mul(s_x * s_w)

with the int8 weights shifted to uint8 around zero point 128 (SparseML's convention; the values are the same
numbers, the kernel sees a fixed zero point). Per-channel weight scales become a per-column rescale vector.
Embedding tables quantized by the QDQ pass (8-bit table -> DequantizeLinear -> Gather) are gathered as
uint8 and dequantized after the Gather. Everything else (attention's activation x activation products, FFN down projections the QDQ pass
left in fp32, norms) stays as it is.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from edgeprune.core.errors import EdgePruneError

UINT8_ZERO_POINT = 128


def _shift_to_uint8(array: np.ndarray) -> np.ndarray:
    return (array.astype(np.int32) + UINT8_ZERO_POINT).astype(np.uint8)


def qdq_to_matmulinteger(model) -> dict[str, Any]:
    """Rewrite ``model`` (an onnxruntime static QDQ graph, in place); returns counts for the manifest."""
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)

    def const(name):
        return numpy_helper.to_array(inits[name]) if name in inits else None

    new_inits, remove, added, converted, skipped = {}, set(), [], 0, 0
    for node in list(graph.node):
        if node.op_type != "MatMul":
            continue
        a, b = (producer.get(x) for x in node.input[:2])
        if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
            continue
        quant = producer.get(a.input[0])
        weight = const(b.input[0])
        if quant is None or quant.op_type != "QuantizeLinear" or weight is None or weight.dtype != np.int8 \
                or weight.ndim != 2:
            skipped += 1
            continue
        x_scale, w_scale = const(a.input[1]), const(b.input[1])
        x_zero = const(a.input[2]) if len(a.input) > 2 else None
        w_zero = const(b.input[2]) if len(b.input) > 2 else None
        if x_scale is None or w_scale is None or x_scale.size != 1 or (w_zero is not None and np.any(w_zero != 0)):
            skipped += 1  # only symmetric weights and per-tensor activations map onto this form
            continue
        base = node.name or node.output[0]
        w_name, zp_name, scale_name = f"{base}_W_uint8", f"{base}_W_zero_point", f"{base}_rescale"
        new_inits[w_name] = numpy_helper.from_array(_shift_to_uint8(weight), w_name)
        new_inits[zp_name] = numpy_helper.from_array(np.array(UINT8_ZERO_POINT, np.uint8), zp_name)
        rescale = (x_scale.astype(np.float32).reshape(()) * w_scale.astype(np.float32)).astype(np.float32)
        new_inits[scale_name] = numpy_helper.from_array(rescale.reshape(-1) if rescale.ndim else rescale, scale_name)
        x_zero_name = a.input[2] if len(a.input) > 2 else None
        if x_zero is None:
            x_zero_name = f"{base}_x_zero_point"
            new_inits[x_zero_name] = numpy_helper.from_array(np.array(0, np.uint8), x_zero_name)
        integer = f"{base}_int32"
        added += [helper.make_node("MatMulInteger", [quant.output[0], w_name, x_zero_name, zp_name], [integer],
                                   f"{base}_quant"),
                  helper.make_node("Cast", [integer], [f"{integer}_fp32"], f"{base}_cast", to=1),
                  helper.make_node("Mul", [f"{integer}_fp32", scale_name], [node.output[0]], f"{base}_rescale_mul")]
        remove.add(id(node))
        if len(consumers.get(b.output[0], [])) == 1:
            remove.add(id(b))
        if len(consumers.get(a.output[0], [])) == 1:
            remove.add(id(a))
        converted += 1
    if not converted:
        raise EdgePruneError("int8-static for DeepSparse: no quantized weight MatMul to convert (QDQ pattern not found)")

    # Embedding tables (SparseML's QuantizeQATEmbedding): Gather(DequantizeLinear(table_int8)) becomes
    # DequantizeLinear(Gather(table_uint8), zero point 128), so the Gather reads the 1-byte table. DeepSparse
    # 1.8 aborts on a Gather of a dequantized table (assertion in gather.cpp).
    embeddings = 0
    for gather in graph.node:
        dequant = producer.get(gather.input[0]) if gather.op_type == "Gather" else None
        if dequant is None or dequant.op_type != "DequantizeLinear" or id(dequant) in remove:
            continue
        table = const(dequant.input[0])
        scale = const(dequant.input[1])
        zero = const(dequant.input[2]) if len(dequant.input) > 2 else None
        if table is None or scale is None or scale.size != 1 or table.dtype not in (np.int8, np.uint8):
            continue
        if table.dtype == np.uint8:  # onnxruntime quantizes Gather tables like activations: uint8, own zero point
            name, zp = dequant.input[0], dequant.input[2]
        else:
            if zero is not None and np.any(zero != 0):
                continue
            name = f"{dequant.input[0]}_uint8"
            new_inits[name] = numpy_helper.from_array(_shift_to_uint8(table), name)
            zp = f"{name}_zero_point"
            new_inits[zp] = numpy_helper.from_array(np.array(UINT8_ZERO_POINT, np.uint8), zp)
        gathered = f"{gather.output[0]}_uint8"
        added.append(helper.make_node("DequantizeLinear", [gathered, dequant.input[1], zp], [gather.output[0]],
                                      f"{gather.name}_dequant"))
        gather.input[0], gather.output[0] = name, gathered
        if len(consumers.get(dequant.output[0], [])) == 1:
            remove.add(id(dequant))
        embeddings += 1

    kept = [n for n in graph.node if id(n) not in remove]
    del graph.node[:]
    graph.node.extend(_topological(kept + added))
    graph.initializer.extend(new_inits.values())
    used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
    unused = [t for t in graph.initializer if t.name not in used]
    for t in unused:
        graph.initializer.remove(t)
    return {"form": "MatMulInteger + Cast + Mul (SparseML's DeepSparse export convention)",
            "matmul_integer": converted, "weight_zero_point": UINT8_ZERO_POINT, "uint8_embeddings": embeddings,
            "not_converted": skipped}


def _topological(nodes: list) -> list:
    """Nodes in an order where every input is produced before it is read (graph inputs/initializers are free)."""
    produced_by = {o: k for k, n in enumerate(nodes) for o in n.output}
    order, state = [], [0] * len(nodes)
    for start in range(len(nodes)):
        if state[start]:
            continue
        stack = [(start, iter(nodes[start].input))]
        state[start] = 1
        while stack:
            k, inputs = stack[-1]
            nxt = next((produced_by[i] for i in inputs if i in produced_by and not state[produced_by[i]]), None)
            if nxt is None:
                stack.pop()
                state[k] = 2
                order.append(nodes[k])
            else:
                state[nxt] = 1
                stack.append((nxt, iter(nodes[nxt].input)))
    return order
