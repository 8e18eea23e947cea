"""Decode-shape cost of one 4-bit MatMulNBits in each zero-point form onnxruntime can load: symmetric (no zero
points), integer zero points, float zero points as stored, and float zero points rewritten to the symmetric
kernel plus the exact per-block correction (``exporters.quantize.symmetric_zero_points``). A chain of square
nodes (so each reads the last one's output), timed interleaved, median of rounds, microseconds per node.

    python benchmarks/tools/matmulnbits_zero_points.py [--width 576] [--nodes 48] [--rounds 5]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from edgeprune.core.onnxio import ort_session
from edgeprune.exporters import gptq
from edgeprune.exporters.quantize import symmetric_zero_points

FORMS = ("symmetric", "integer", "float", "float rewritten")


def chain(form: str, width: int, count: int, rng) -> bytes:
    zero_point = {"symmetric": "none", "integer": "integer"}.get(form, "float")
    nodes, inits, prev = [], [], "x"
    for i in range(count):
        weight = rng.standard_normal((width, width)).astype(np.float32) * 0.02
        codes, scales, zeros = gptq.gptq_quantize(weight, np.eye(width),
                                                  gptq.GPTQSettings(zero_point=zero_point, clip_search=False))
        inputs = [prev, f"b{i}", f"s{i}"]
        inits += [numpy_helper.from_array(gptq.pack_codes(codes, 32), f"b{i}"), numpy_helper.from_array(scales, f"s{i}")]
        if zero_point != "none":
            stored = gptq.pack_zero_points(zeros) if zero_point == "integer" else zeros
            inits.append(numpy_helper.from_array(stored, f"z{i}"))
            inputs.append(f"z{i}")
        nodes.append(helper.make_node("MatMulNBits", inputs, [f"y{i}"], domain="com.microsoft", K=width, N=width,
                                      bits=4, block_size=32, accuracy_level=4))
        prev = f"y{i}"
    graph = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, width])],
                              [helper.make_tensor_value_info(prev, TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    if form == "float rewritten":
        symmetric_zero_points(model)
    return model.SerializeToString()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=576)
    parser.add_argument("--nodes", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    sessions = {form: ort_session(chain(form, args.width, args.nodes, rng), threads=args.threads) for form in FORMS}
    x = rng.standard_normal((1, 1, args.width)).astype(np.float32)
    per_node = {form: [] for form in FORMS}
    for _ in range(args.rounds):
        for form, session in sessions.items():
            session.run(None, {"x": x})
            start = time.perf_counter()
            for _ in range(args.calls):
                session.run(None, {"x": x})
            per_node[form].append((time.perf_counter() - start) / args.calls / args.nodes * 1e6)
    base = float(np.median(per_node["symmetric"]))
    print(f"| form | µs per node (median of {args.rounds} rounds) | vs symmetric |\n|---|---|---|")
    for form, values in per_node.items():
        print(f"| {form} | {np.median(values):.1f} | {np.median(values) / base:.2f}x |")


if __name__ == "__main__":
    main()
