"""Which sequence lengths DeepSparse 1.8 runs a no-past decoder graph at (docs/runtime.md, "The rotary Concat
rewrite"): one fresh DeepSparse process per length, static input shapes as edgeprune's worker compiles them.

    python benchmarks/tools/deepsparse_length_probe.py EXPORT/model_dense.onnx 1 8 15 16 32 128
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import tempfile
from pathlib import Path

from edgeprune.runtime.deepsparse_adapter import crash_reason, deepsparse_python

PROBE = r"""
import sys
import numpy as np
import onnx
from deepsparse import compile_model
path, length = sys.argv[1], int(sys.argv[2])
names = [i.name for i in onnx.load(path, load_external_data=False).graph.input]
values = {"input_ids": np.random.default_rng(0).integers(0, 100, (1, length)).astype(np.int64),
          "attention_mask": np.ones((1, length), np.int64),
          "position_ids": np.arange(length, dtype=np.int64)[None]}
feeds = [values[n] for n in names]
engine = compile_model(path, batch_size=1, num_cores=2, input_shapes=[list(f.shape) for f in feeds])
print("shape", engine.run(feeds)[0].shape)
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path, help="a no-past decoder ONNX file (e.g. a --target deepsparse export's)")
    parser.add_argument("lengths", type=int, nargs="+")
    args = parser.parse_args()
    python = deepsparse_python()
    if python is None:
        raise SystemExit("no DeepSparse environment: edgeprune runtime install deepsparse")
    print("| length | result |\n| --- | --- |")
    for length in args.lengths:
        with tempfile.TemporaryDirectory() as tmp:
            copy = Path(tmp) / "model.onnx"  # DeepSparse rewrites the input shapes of the file it compiles
            shutil.copy2(args.onnx, copy)
            result = subprocess.run([python, "-c", PROBE, str(copy), str(length)], capture_output=True, text=True)
        said = "runs" if result.returncode == 0 else crash_reason(result.stderr or "no output")
        print(f"| {length} | {said} |", flush=True)


if __name__ == "__main__":
    main()
