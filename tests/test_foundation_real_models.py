"""Real-model checks (slow): MiniLM and SmolLM2-135M prune, reload, evaluate and generate."""

import pytest
import torch

from edgeprune.core.data_sources import resolve_data

pytestmark = pytest.mark.slow


def test_minilm_prune_reload_eval(tmp_path):
    from edgeprune.compress.api import CompressConfig, compress
    from edgeprune.compress.plan import StructuredConfig
    from edgeprune.eval.api import EvalConfig, evaluate

    out = compress("minilm", tmp_path / "m", CompressConfig(structured=StructuredConfig(heads=0.5, ffn=0.5)))
    result = evaluate(str(out), resolve_data("stsb:dev"), EvalConfig(task="sts"), progress=False)
    assert result["n"] == 1500
    assert 70.0 < result["value"] < 86.72  # magnitude 50/50 measured 78.63


def test_smollm2_prune_reload_generate(tmp_path):
    from edgeprune.compress.api import CompressConfig, compress
    from edgeprune.core.model_artifact import load_artifact
    from edgeprune.compress.plan import StructuredConfig
    from edgeprune.core.loading import smollm2_path

    if not smollm2_path().is_file():
        pytest.skip("run `edgeprune models fetch smollm2-135m` first")
    out = compress("smollm2-135m", tmp_path / "s", CompressConfig(structured=StructuredConfig(heads=0.25, ffn=0.25)))
    loaded = load_artifact(out)
    shapes = loaded.adapter.shapes(loaded.model.config)
    assert all(s.heads == 6 and s.kv_heads == 3 and s.ffn == 1152 for s in shapes)
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt")
    generated = loaded.model.generate(**ids, max_new_tokens=8, do_sample=False)
    assert generated.shape[1] == ids["input_ids"].shape[1] + 8
    with torch.no_grad():
        assert torch.isfinite(loaded.model(**ids).logits).all()
