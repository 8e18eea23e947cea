"""Per-operator-type kernel time of one ONNX file under onnxruntime's profiler (batch 1, seq 128,
2 threads, 200 runs), optionally with ORT optimizers disabled. Used for docs/runtime.md:

    python benchmarks/tools/ort_profile.py S50_INT8/model.onnx                      # ORT's own optimizer set
    python benchmarks/tools/ort_profile.py S50_INT8/model.onnx SkipLayerNormFusion  # edgeprune's default
"""

import collections
import json
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    path, disabled = sys.argv[1], sys.argv[2].split(",") if len(sys.argv) > 2 else []
    options = ort.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads, options.enable_profiling = 2, 1, True
    session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
    rng = np.random.default_rng(0)
    feeds = {i.name: (rng.integers(1000, 2000, (1, 128)) if i.name == "input_ids" else
                      np.ones((1, 128)) if i.name == "attention_mask" else np.zeros((1, 128))).astype(np.int64)
             for i in session.get_inputs()}
    runs = 200
    for _ in range(runs):
        session.run(None, feeds)
    trace = Path(session.end_profiling())
    spent, nodes = collections.Counter(), collections.Counter()
    for event in json.loads(trace.read_text()):
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            spent[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]] += 1
    trace.unlink()
    total = sum(spent.values())
    for op, us in spent.most_common(15):
        print(f"{op:28s} {us / runs:8.1f} us/run {100 * us / total:5.1f}%  nodes/run {nodes[op] / runs:.0f}")
    print(f"total kernel time {total / runs:.1f} us/run")


if __name__ == "__main__":
    main()
