"""Save a model edgeprune can load (alias, .gguf, artifact) as a plain Hugging Face directory: fp32
safetensors + tokenizer, for tools that take an HF path (lm-evaluation-harness's ``hf`` model).

    python benchmarks/tools/save_hf.py smollm2-135m OUT
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("output")
    args = parser.parse_args(argv)
    from edgeprune.core.artifacts import check_output_dir, staged_output
    from edgeprune.core.loading import load_model

    loaded = load_model(args.model, task="text-generation")
    check_output_dir(args.output, overwrite=False)
    with staged_output(args.output) as tmp:
        loaded.model.save_pretrained(tmp, safe_serialization=True)
        loaded.tokenizer.save_pretrained(tmp)
    print(Path(args.output).resolve())
    return 0


if __name__ == "__main__":
    sys.exit(main())
