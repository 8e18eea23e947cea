"""Peak memory and time of one consumer's re-fit (``reconstruct._fit_consumer``, scale mode) at a large model's
width: normal equations of a d-wide FFN output projection accumulated from 4 batches of 1,024 bf16 tokens,
then the fit. Prints the high-water mark before and after the fit, so two versions of the module compare:

    python benchmarks/tools/refit_memory_probe.py                                  # this checkout
    git show REV:edgeprune/compress/reconstruct.py > /tmp/old.py
    python benchmarks/tools/refit_memory_probe.py --module /tmp/old.py             # another version
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--module", help="a reconstruct.py to load instead of edgeprune.compress.reconstruct")
    parser.add_argument("--width", type=int, default=8192, help="consumer input width d (default 8192)")
    parser.add_argument("--out", type=int, default=3072, help="consumer output width (default 3072)")
    args = parser.parse_args()

    import torch

    from edgeprune.core.arch.base import ParamSlice

    if args.module:
        spec = importlib.util.spec_from_file_location("edgeprune.compress.reconstruct_probe", args.module)
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module  # dataclasses look their module up
        spec.loader.exec_module(module)
    else:
        import edgeprune.compress.reconstruct as module
    torch.manual_seed(0)
    linear = torch.nn.Linear(args.width, args.out, bias=False).to(torch.bfloat16)
    normal = None
    for _ in range(4):
        x = torch.randn(1024, args.width, dtype=torch.bfloat16)
        y = torch.randn(1024, args.out, dtype=torch.bfloat16)
        normal = module._accumulate(normal, x, y)
    del x, y
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    result = module._fit_consumer(ParamSlice(linear, "weight", 1, ("ffn",), "consumer"), normal, "scales",
                                  1e-2, True, 1)
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(f"hwm before the fit {before / 1e6:.2f} GB, after {after / 1e6:.2f} GB (+{(after - before) / 1e6:.2f}), "
          f"fit {time.perf_counter() - started:.1f} s, errors {({k: round(v, 6) for k, v in result.items()})}")


if __name__ == "__main__":
    main()
