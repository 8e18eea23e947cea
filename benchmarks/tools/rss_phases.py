"""Peak memory of ``edgeprune compress --sequential`` phase by phase: runs the ``edgeprune`` command line in
this process and prints the current RSS and the kernel's high-water mark (VmHWM) at the entry and exit of
each phase of the sequential path (config, weights directory, tokenizer, calibration, captures, passes, the
sequential Fisher's sweeps).

    python benchmarks/tools/rss_phases.py compress smollm2-135m -o OUT --sequential --recipe ... --calib ...

Printed values are kB / 1000 as /proc reports them (kB = KiB), the convention of benchmarks/RESULTS.md.
"""

from __future__ import annotations

import functools
import sys
import time


def _hwm_kb() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM"):
                return int(line.split()[1])
    return 0


def main(argv: list[str]) -> int:
    import psutil

    process, started = psutil.Process(), time.time()

    def mark(tag: str) -> None:
        print(f"[{time.time() - started:7.1f}s] {tag:40s} rss={process.memory_info().rss / 1e9:.3f} "
              f"hwm={_hwm_kb() / 1e6:.3f}", file=sys.stderr, flush=True)

    mark("start")
    import transformers

    mark("imports")
    import edgeprune.compress.calibration as calibration
    import edgeprune.compress.lazy_weights as lazy_weights
    import edgeprune.compress.sequential as sequential

    def wrap(module, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def wrapped(*args, **kwargs):
            mark(f"> {name}")
            try:
                return original(*args, **kwargs)
            finally:
                mark(f"< {name}")

        setattr(module, name, wrapped)

    for name in ("_parse_gguf", "_read_config", "_load_tokenizer", "_capture_inputs", "_score_pass", "_write_pass"):
        wrap(sequential, name)
    import edgeprune.compress.reconstruct as reconstruct
    import edgeprune.compress.sequential_fisher as sequential_fisher

    for name in ("sequential_scores", "_head_gradients"):  # pass 1 of the gradient criteria
        wrap(sequential_fisher, name)

    wrap(reconstruct, "refit_block")  # per block of pass 2 (imported by _write_pass when it runs)
    wrap(sequential.ShardWriter, "flush")
    wrap(lazy_weights, "open_weights")
    wrap(calibration, "load_calibration")
    del transformers
    from edgeprune.cli import main as cli

    try:
        return cli(argv)
    finally:
        mark("end")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
