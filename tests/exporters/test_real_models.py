"""Real models (slow): MiniLM 50/50 export sizes and STS through onnxruntime; SmolLM2 KV-cache export."""

import pytest

from edgeprune.core.artifacts import read_manifest
from edgeprune.compress.api import CompressConfig, compress
from edgeprune.compress.plan import StructuredConfig
from edgeprune.exporters.api import ExportConfig, export

pytestmark = pytest.mark.slow


def sts(model, runtime=None, limit=400):
    from edgeprune.eval.api import EvalConfig, evaluate
    from edgeprune.core.data_sources import resolve_data

    result = evaluate(str(model), resolve_data("stsb:dev"), EvalConfig(task="sts", limit=limit), runtime=runtime)
    return result["value"]


def test_minilm_pruned_fp32_and_int8(tmp_path):
    pruned = compress("minilm", tmp_path / "p50", CompressConfig(structured=StructuredConfig(heads=0.5, ffn=0.5)))
    fp32 = export(str(pruned), tmp_path / "fp32", progress=False)
    int8 = export(str(pruned), tmp_path / "int8", ExportConfig(quantize="int8-dynamic"), progress=False)
    fp32_mb = read_manifest(fp32)["variants"][0]["bytes"] / 1e6
    int8_mb = read_manifest(int8)["variants"][0]["bytes"] / 1e6
    assert 60 < fp32_mb < 75 and int8_mb < 20
    reference = sts(pruned)
    assert abs(sts(fp32, "onnxruntime") - reference) <= 0.3
    assert abs(sts(int8, "onnxruntime") - reference) <= 1.0


def test_smollm2_within_gqa_pruned_kv_cache_export(tmp_path):
    from edgeprune.core.loading import smollm2_path

    if not smollm2_path().is_file():
        pytest.skip("smollm2-135m not fetched (edgeprune models fetch smollm2-135m)")
    pruned = compress("smollm2-135m", tmp_path / "p", CompressConfig(structured=StructuredConfig(heads=0.34, ffn=0.3)))
    out = export(str(pruned), tmp_path / "e", progress=False)
    manifest = read_manifest(out)
    assert manifest["with_past"] and len(manifest["kv_layout"]) == 30
    assert manifest["validation"]["fp32"]["generation"]["match"]
