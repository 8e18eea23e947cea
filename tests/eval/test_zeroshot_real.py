"""Dense SmolLM2-135M through edgeprune agrees with lm-evaluation-harness on the same local items."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path

import pytest

TOOLS = Path(__file__).resolve().parents[2] / "benchmarks" / "tools"
LIMIT = 300


@pytest.mark.slow
def test_dense_smollm2_agrees_with_lm_eval_within_half_a_point(tmp_path):
    if importlib.util.find_spec("lm_eval") is None:
        pytest.skip("lm-eval missing: pip install -e '.[crosscheck]'")
    from edgeprune.core.loading import smollm2_path

    if not smollm2_path().is_file():
        pytest.skip("SmolLM2 not fetched: edgeprune models fetch smollm2-135m")
    sys.path.insert(0, str(TOOLS))
    import lm_eval_crosscheck
    import save_hf

    model_dir = tmp_path / "smollm2-hf"
    save_hf.main(["smollm2-135m", str(model_dir)])
    result = lm_eval_crosscheck.compare(str(model_dir), limit=LIMIT)
    print("\n" + lm_eval_crosscheck.format_table(result))  # the numbers docs/zero-shot.md quotes (pytest -s)
    if os.environ.get("EDGEPRUNE_CROSSCHECK_JSON"):  # keep the full result of this long run for the docs
        Path(os.environ["EDGEPRUNE_CROSSCHECK_JSON"]).write_text(json.dumps(result, indent=1))
    assert {r["task"] for r in result["rows"]} == {"lambada", "hellaswag", "piqa"}
    for row in result["rows"]:
        assert row["n"] == LIMIT
        assert abs(row["diff_points"]) <= 0.5, row  # accuracy points, or % of perplexity
