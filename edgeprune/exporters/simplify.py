"""Fold shape arithmetic out of exported graphs.

torch.onnx exports every attention reshape as ``Shape -> Gather -> Unsqueeze -> Concat -> Reshape`` and the
SDPA scale as ``Shape -> Slice -> Cast -> Sqrt -> Div``: about 20 tiny operators per layer that run on every
call. After pruning, the per-layer head counts and widths are fixed numbers, so these chains are constants
except for the batch and sequence dimensions, which ``Reshape`` can copy from its input with a ``0``. With
the matrix multiplications made small (structured pruning, INT8), the chains are a measurable share of the
latency. Symbolic shape inference tells which dimension each symbol is; anything it cannot prove is left
alone, and the export gate re-validates the result numerically.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

_Sym = list  # a 1-D shape tensor known element-wise: int or a symbolic dimension name
# Small single-node evaluations (shape arithmetic); larger constant outputs are never materialised.
_MAX_FOLDED_ELEMENTS = 4096


def _dims(value_info) -> list[int | str] | None:
    tensor_type = value_info.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = []
    for d in tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(int(d.dim_value))
        elif d.dim_param:
            dims.append(d.dim_param)
        else:
            return None
    return dims


def _attr(node, name: str, default=None):
    from onnx import helper

    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def _evaluate(node, inputs: list[np.ndarray], opset: int) -> list[np.ndarray] | None:
    """Run one standard-domain node on constant inputs with the ONNX reference evaluator."""
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    if node.domain not in ("", "ai.onnx") or node.op_type in ("RandomNormal", "RandomUniform", "Multinomial",
                                                                "RandomNormalLike", "RandomUniformLike", "Bernoulli"):
        return None
    names = [f"in{i}" for i in range(len(inputs))]
    inits = [numpy_helper.from_array(np.asarray(v), n) for v, n in zip(inputs, names)]
    clone = helper.make_node(node.op_type, names, [f"out{i}" for i in range(len(node.output))], domain=node.domain)
    clone.attribute.extend(node.attribute)
    graph = helper.make_graph([clone], "fold", [], [helper.make_value_info(o, helper.TypeProto()) for o in clone.output],
                              inits)
    try:
        outputs = ReferenceEvaluator(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])).run(None, {})
    except Exception:  # an op the reference evaluator cannot run here: leave the node in the graph
        return None
    if any(np.asarray(o).size > _MAX_FOLDED_ELEMENTS for o in outputs):
        return None
    return [np.asarray(o) for o in outputs]


def _symbolic_shapes(model):
    """ORT's symbolic shape inference, keeping what it inferred when it cannot finish (``infer_shapes``
    raises then). Tensors it could not follow stay unknown. ``auto_merge`` equates dimensions that a
    broadcast says must match at run time, e.g. BERT's ``Min(512, sequence_length)`` position slice with
    ``sequence_length``; the export gate re-validates the folded graph at several shapes regardless.

    Why not the public ``SymbolicShapeInference.infer_shapes``: when any tensor stays unknown it raises and
    drops the partial result folding needs, and (onnxruntime 1.x) first saves ``sym_shape_infer_temp.onnx``
    plus external data into the current directory. So this runs ``infer_shapes``'s own body (the same four
    private steps) without its final raise. The private names are used here only; if a later onnxruntime
    renames them, the AttributeError lands in ``simplify``'s ``except`` and the graph is exported
    unsimplified (a missed fold, never a wrong one)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    inference = SymbolicShapeInference(int_max=2**31 - 1, auto_merge=True, guess_output_rank=False, verbose=0)
    inference._preprocess(model)
    while inference.run_:
        inference._infer_impl()
    inference._update_output_from_vi()
    return inference.out_mp_


@contextlib.contextmanager
def _large_weights_set_aside(model):
    """For a graph over protobuf's 2 GB (shape inference serialises it): the data of initializers too large to
    be shape values is taken out for the duration (their dims and types stay, which is all inference reads)
    and put back after. Smaller graphs are left as they are."""
    from edgeprune.core.onnxio import needs_external_data

    if not needs_external_data(model):
        yield
        return
    aside = {}
    for init in model.graph.initializer:
        if np.prod(init.dims, dtype=np.int64) > _MAX_FOLDED_ELEMENTS and init.HasField("raw_data"):
            aside[init.name] = init.raw_data
            init.ClearField("raw_data")
    try:
        yield
    finally:
        for init in model.graph.initializer:
            if init.name in aside:
                init.raw_data = aside[init.name]


def _as_sym(value: np.ndarray) -> _Sym | None:
    if value.dtype.kind in "iu" and value.ndim <= 1:
        return [int(v) for v in value.reshape(-1)]
    return None


def _propagate(graph, dims: dict, known: dict, sym: dict, scalar_sym: dict, folded: set, reshape_shapes: dict,
               record: Callable, opset: int) -> None:
    """One pass in graph order: constants and element-wise shape values through Shape/Gather/Slice/
    Unsqueeze/Concat, static Reshape targets, and nodes whose every input is now known."""
    from onnx import numpy_helper

    graph_outputs = {o.name for o in graph.output}
    for position, node in enumerate(graph.node):
        op = node.op_type
        if node.domain not in ("", "ai.onnx"):
            continue
        if op == "Constant":
            value = _attr(node, "value")
            if value is not None:
                known[node.output[0]] = numpy_helper.to_array(value)
            continue
        if op == "Shape" and node.input[0] in dims:
            shape = dims[node.input[0]]
            start, end = _attr(node, "start", 0), _attr(node, "end", None)
            record(node.output[0], shape[start:end] if end is not None else shape[start:])
            continue
        if op == "Gather" and node.input[0] in sym and node.input[1] in known and _attr(node, "axis", 0) == 0:
            index = known[node.input[1]]
            values = sym[node.input[0]]
            record(node.output[0], [values[int(i)] for i in index.reshape(-1)], scalar=index.ndim == 0)
            continue
        if op == "Slice" and node.input[0] in sym and all(i in known for i in node.input[1:] if i):
            values = sym[node.input[0]]
            starts, ends = (int(known[node.input[k]].reshape(-1)[0]) for k in (1, 2))
            axes = int(known[node.input[3]].reshape(-1)[0]) if len(node.input) > 3 and node.input[3] else 0
            steps = int(known[node.input[4]].reshape(-1)[0]) if len(node.input) > 4 and node.input[4] else 1
            if axes == 0 and steps == 1:
                record(node.output[0], values[starts:ends])  # Python clamps bounds like ONNX Slice
            continue
        if op == "Unsqueeze" and node.input[0] in scalar_sym:
            axes = known.get(node.input[1]) if len(node.input) > 1 else _attr(node, "axes")
            if axes is not None and list(np.asarray(axes).reshape(-1)) == [0]:
                sym[node.output[0]] = [scalar_sym[node.input[0]]]
            continue
        if op == "Concat" and _attr(node, "axis") == 0 and all(i in sym or i in known for i in node.input):
            parts = [sym[i] if i in sym else _as_sym(known[i]) for i in node.input]
            if all(p is not None for p in parts):
                sym[node.output[0]] = [d for p in parts for d in p]
            continue
        if op == "Reshape" and node.input[1] in sym and not _attr(node, "allowzero", 0):
            data_dims = dims.get(node.input[0])
            target = sym[node.input[1]]
            new = []
            for j, d in enumerate(target):
                if isinstance(d, int):
                    new.append(d)
                elif data_dims is not None and j < len(data_dims) and data_dims[j] == d:
                    new.append(0)  # ONNX Reshape: 0 copies this dimension from the input
                else:
                    new = None
                    break
            if new is not None and not (0 in new and -1 in new and new.count(-1) > 1):
                reshape_shapes[position] = np.asarray(new, dtype=np.int64)
            continue
        # (an omitted optional input in the middle would shift positions in the one-node copy: skip those)
        if node.input and all(i and i in known for i in node.input) and op != "Shape":
            outputs = _evaluate(node, [known[i] for i in node.input], opset)
            if outputs is not None:
                for name, value in zip(node.output, outputs):
                    known[name] = value
                    if name not in graph_outputs:
                        folded.add(name)


def _rewrite(graph, known: dict, folded: set, reshape_shapes: dict) -> int:
    """Feed folded values and static reshape targets as initializers, then drop dead nodes and unused
    initializers; returns how many folded values were fed."""
    from onnx import numpy_helper

    graph_outputs = {o.name for o in graph.output}
    new_inits = []
    used_names = {i.name for i in graph.initializer}

    def constant_input(value: np.ndarray, hint: str) -> str:
        name = f"{hint}__folded"
        while name in used_names:
            name += "_"
        used_names.add(name)
        new_inits.append(numpy_helper.from_array(value, name))
        return name

    replacements: dict[str, str] = {}
    for position, node in enumerate(graph.node):
        if position in reshape_shapes:
            node.input[1] = constant_input(reshape_shapes[position], node.input[1])
        for k, name in enumerate(node.input):
            if name in folded and not all(o in folded for o in node.output):
                if name not in replacements:
                    replacements[name] = constant_input(known[name], name)
                node.input[k] = replacements[name]
    graph.initializer.extend(new_inits)
    # Dead-node elimination: drop nodes none of whose outputs are read any more.
    while True:
        read = {i for n in graph.node for i in n.input} | graph_outputs
        dead = [n for n in graph.node if not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input}
    unused = [i for i in graph.initializer if i.name not in read]
    for init in unused:
        graph.initializer.remove(init)
    return len(replacements)


def simplify(src: Path, dst: Path) -> dict[str, Any]:
    """Write ``src`` with shape arithmetic folded to ``dst``; returns operator counts before/after."""
    import onnx
    from onnx import numpy_helper
    from edgeprune.core.onnxio import save_onnx

    model = onnx.load(str(src))
    nodes_before = len(model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    try:
        with _large_weights_set_aside(model):
            inferred = _symbolic_shapes(model)
    except Exception:  # graphs symbolic inference cannot follow are exported as they are
        save_onnx(model, dst)
        return {"nodes_before": nodes_before, "nodes_after": nodes_before, "skipped": "symbolic shape inference failed"}
    dims = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output):
        d = _dims(vi)
        if d is not None:
            dims[vi.name] = d

    graph = model.graph
    graph_outputs = {o.name for o in graph.output}
    known: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer
                                    if np.prod(i.dims, dtype=np.int64) <= _MAX_FOLDED_ELEMENTS}
    sym: dict[str, _Sym] = {}  # 1-D int tensors known per element (ints or symbols)
    scalar_sym: dict[str, int | str] = {}  # 0-D int tensors that are one (maybe symbolic) dimension
    folded: set[str] = set()  # outputs now constant: consumers read a new initializer instead
    reshape_shapes: dict[int, np.ndarray] = {}

    def record(name: str, value, scalar: bool = False) -> None:
        """A shape value: a constant when every element is a number, else kept element-wise."""
        if all(isinstance(d, int) for d in value):
            known[name] = np.asarray(value[0] if scalar else value, dtype=np.int64)
            if name not in graph_outputs:
                folded.add(name)
        elif scalar:
            scalar_sym[name] = value[0]
        else:
            sym[name] = list(value)

    _propagate(graph, dims, known, sym, scalar_sym, folded, reshape_shapes, record, opset)
    if not folded and not reshape_shapes:
        save_onnx(model, dst)
        return {"nodes_before": nodes_before, "nodes_after": nodes_before, "reshapes_made_static": 0}

    constants_folded = _rewrite(graph, known, folded, reshape_shapes)
    save_onnx(model, dst)
    return {"nodes_before": nodes_before, "nodes_after": len(graph.node),
            "reshapes_made_static": len(reshape_shapes), "constants_folded": constants_folded}
