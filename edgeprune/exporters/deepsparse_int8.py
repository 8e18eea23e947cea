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
from edgeprune.core.onnxio import drop_unused_initializers

UINT8_ZERO_POINT = 128


def _shift_to_uint8(array: np.ndarray) -> np.ndarray:
    return (array.astype(np.int32) + UINT8_ZERO_POINT).astype(np.uint8)


class _Rewrite:
    """The graph's lookups and the pending edits, shared by the MatMul and the embedding passes."""

    def __init__(self, graph):
        self.graph = graph
        self.inits = {t.name: t for t in graph.initializer}
        self.producer = {o: n for n in graph.node for o in n.output}
        self.consumers: dict[str, list] = {}
        for n in graph.node:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)
        self.new_inits: dict[str, Any] = {}
        self.remove: set[int] = set()
        self.added: list = []

    def const(self, name):
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name]) if name in self.inits else None

    def add_init(self, name: str, array: np.ndarray) -> str:
        from onnx import numpy_helper

        self.new_inits[name] = numpy_helper.from_array(array, name)
        return name

    def drop_if_sole_reader(self, node, reader_output: str) -> None:
        if len(self.consumers.get(reader_output, [])) == 1:
            self.remove.add(id(node))

    def apply(self) -> None:
        graph = self.graph
        kept = [n for n in graph.node if id(n) not in self.remove]
        del graph.node[:]
        graph.node.extend(_topological(kept + self.added))
        graph.initializer.extend(self.new_inits.values())
        drop_unused_initializers(graph)


def qdq_to_matmulinteger(model) -> dict[str, Any]:
    """Rewrite ``model`` (an onnxruntime static QDQ graph, in place); returns counts for the manifest."""
    rw = _Rewrite(model.graph)
    converted = skipped = 0
    for node in list(model.graph.node):
        outcome = _convert_matmul(rw, node)
        converted += outcome is True
        skipped += outcome is False
    if not converted:
        raise EdgePruneError("int8-static for DeepSparse: no quantized weight MatMul to convert (QDQ pattern not found)")
    embeddings = sum(_uint8_embedding(rw, gather) for gather in model.graph.node)
    rw.apply()
    return {"form": "MatMulInteger + Cast + Mul (SparseML's DeepSparse export convention)",
            "matmul_integer": converted, "weight_zero_point": UINT8_ZERO_POINT, "uint8_embeddings": embeddings,
            "not_converted": skipped}


def _convert_matmul(rw: _Rewrite, node) -> bool | None:
    """One weight MatMul to MatMulInteger + Cast + Mul: True converted, False a QDQ MatMul this form cannot
    hold (counted as not converted), None not a QDQ weight MatMul."""
    from onnx import helper

    if node.op_type != "MatMul":
        return None
    a, b = (rw.producer.get(x) for x in node.input[:2])
    if a is None or b is None or a.op_type != "DequantizeLinear" or b.op_type != "DequantizeLinear":
        return None
    quant = rw.producer.get(a.input[0])
    weight = rw.const(b.input[0])
    if quant is None or quant.op_type != "QuantizeLinear" or weight is None or weight.dtype != np.int8 \
            or weight.ndim != 2:
        return False
    x_scale, w_scale = rw.const(a.input[1]), rw.const(b.input[1])
    x_zero = rw.const(a.input[2]) if len(a.input) > 2 else None
    w_zero = rw.const(b.input[2]) if len(b.input) > 2 else None
    if x_scale is None or w_scale is None or x_scale.size != 1 or (w_zero is not None and np.any(w_zero != 0)):
        return False  # only symmetric weights and per-tensor activations map onto this form
    base = node.name or node.output[0]
    w_name = rw.add_init(f"{base}_W_uint8", _shift_to_uint8(weight))
    zp_name = rw.add_init(f"{base}_W_zero_point", np.array(UINT8_ZERO_POINT, np.uint8))
    rescale = (x_scale.astype(np.float32).reshape(()) * w_scale.astype(np.float32)).astype(np.float32)
    scale_name = rw.add_init(f"{base}_rescale", rescale.reshape(-1) if rescale.ndim else rescale)
    x_zero_name = a.input[2] if len(a.input) > 2 else None
    if x_zero is None:
        x_zero_name = rw.add_init(f"{base}_x_zero_point", np.array(0, np.uint8))
    integer = f"{base}_int32"
    rw.added += [helper.make_node("MatMulInteger", [quant.output[0], w_name, x_zero_name, zp_name], [integer],
                                  f"{base}_quant"),
                 helper.make_node("Cast", [integer], [f"{integer}_fp32"], f"{base}_cast", to=1),
                 helper.make_node("Mul", [f"{integer}_fp32", scale_name], [node.output[0]], f"{base}_rescale_mul")]
    rw.remove.add(id(node))
    rw.drop_if_sole_reader(b, b.output[0])
    rw.drop_if_sole_reader(a, a.output[0])
    return True


def _uint8_embedding(rw: _Rewrite, gather) -> bool:
    """Embedding tables (SparseML's QuantizeQATEmbedding): Gather(DequantizeLinear(table_int8)) becomes
    DequantizeLinear(Gather(table_uint8), zero point 128), so the Gather reads the 1-byte table. DeepSparse
    1.8 aborts on a Gather of a dequantized table (assertion in gather.cpp)."""
    from onnx import helper

    dequant = rw.producer.get(gather.input[0]) if gather.op_type == "Gather" else None
    if dequant is None or dequant.op_type != "DequantizeLinear" or id(dequant) in rw.remove:
        return False
    table = rw.const(dequant.input[0])
    scale = rw.const(dequant.input[1])
    zero = rw.const(dequant.input[2]) if len(dequant.input) > 2 else None
    if table is None or scale is None or scale.size != 1 or table.dtype not in (np.int8, np.uint8):
        return False
    if table.dtype == np.uint8:  # onnxruntime quantizes Gather tables like activations: uint8, own zero point
        name, zp = dequant.input[0], dequant.input[2]
    else:
        if zero is not None and np.any(zero != 0):
            return False
        name = rw.add_init(f"{dequant.input[0]}_uint8", _shift_to_uint8(table))
        zp = rw.add_init(f"{name}_zero_point", np.array(UINT8_ZERO_POINT, np.uint8))
    gathered = f"{gather.output[0]}_uint8"
    rw.added.append(helper.make_node("DequantizeLinear", [gathered, dequant.input[1], zp], [gather.output[0]],
                                     f"{gather.name}_dequant"))
    gather.input[0], gather.output[0] = name, gathered
    rw.drop_if_sole_reader(dequant, dequant.output[0])
    return True


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
