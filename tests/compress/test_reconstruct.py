"""Least-squares reconstruction strictly lowers every layer's reconstruction error on calibration data."""

import copy
import json

import pytest
import torch

from edgeprune.compress.api import CalibrationConfig, CompressConfig, compress, structured_prune
from edgeprune.compress.calibration import load_calibration
from edgeprune.compress.plan import StructuredConfig
from edgeprune.compress.reconstruct import reconstruct
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import load_model
from tiny import sample_texts


@pytest.fixture(scope="module")
def calib_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text("\n".join(t for t in sample_texts(200, seed=5) if len(t) > 20) + "\n")
    return path


def pruned_and_dense(tiny_models, family, calib_file):
    loaded = load_model(tiny_models(family))
    dense = copy.deepcopy(loaded.model)
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_file), samples=48, max_length=24, batch_size=16))
    structured_prune(loaded, StructuredConfig(heads=0.5, ffn=0.5))
    return loaded, dense, calib


def embedding_error(model, dense, calib):
    with torch.no_grad():
        total = 0.0
        for batch in calib:
            a, b = model(**batch), dense(**batch)
            key = "logits" if hasattr(a, "logits") else "last_hidden_state"
            mask = batch["attention_mask"].bool()
            total += float((getattr(a, key) - getattr(b, key))[mask].pow(2).sum())
    return total


@pytest.mark.parametrize("family", ["bert", "gpt2", "llama"])  # Linear with bias, Conv1D, GQA without bias
@pytest.mark.parametrize("mode", ["full", "scales"])
def test_reconstruction_strictly_lowers_layer_error(tiny_models, family, calib_file, mode):
    loaded, dense, calib = pruned_and_dense(tiny_models, family, calib_file)
    before = embedding_error(loaded.model, dense, calib)
    report = reconstruct(loaded.model, dense, loaded.adapter, calib, damping=1e-2, mode=mode, progress=False)
    assert len(report) == len(loaded.adapter.layers(loaded.model))
    for entry in report:
        for module in ("attention", "ffn"):
            errors = entry[module]
            assert errors["mse_after"] < errors["mse_before"], (entry["layer"], module, errors)
            assert errors["rel_after"] < errors["rel_before"]
    if mode == "full":  # with a full re-fit the end-to-end output on calibration data also gets closer
        assert embedding_error(loaded.model, dense, calib) < before


def test_reconstruction_of_identity_is_a_no_op(tiny_models, calib_file):
    loaded = load_model(tiny_models("bert"))
    dense = copy.deepcopy(loaded.model)
    calib = load_calibration(loaded, CalibrationConfig(path=str(calib_file), samples=16, max_length=24))
    report = reconstruct(loaded.model, dense, loaded.adapter, calib, progress=False)
    assert all(e[m]["mse_before"] < 1e-9 for e in report for m in ("attention", "ffn"))
    for (name, a), b in zip(loaded.model.state_dict().items(), dense.state_dict().values()):
        assert torch.allclose(a, b, atol=1e-4), name


def test_compress_records_reconstruction(tiny_models, calib_file, tmp_path):
    config = CompressConfig.from_dict({
        "structured": {"heads": 0.5, "ffn": 0.5, "importance": "fisher"},
        "calibration": {"path": str(calib_file), "samples": 32, "max_length": 24},
        "reconstruct": {"enabled": True, "mode": "scales"},
    })
    out = compress(tiny_models("bert"), tmp_path / "out", config)
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"calibration_s", "structured_s", "reconstruct_s"} <= set(manifest["timings"])
    rec = manifest["reconstruction"]
    assert rec[0]["ffn"]["mse_after"] < rec[0]["ffn"]["mse_before"]
    reloaded = load_model(out)
    batch = reloaded.tokenizer(sample_texts(2), padding=True, return_tensors="pt")
    assert torch.isfinite(reloaded.model(**batch).last_hidden_state).all()


def test_reconstruct_without_calibration_is_a_clear_error(tiny_models, tmp_path):
    config = CompressConfig.from_dict({"structured": {"heads": 0.5}, "reconstruct": {"enabled": True}})
    with pytest.raises(EdgePruneError, match="--calib"):
        compress(tiny_models("bert"), tmp_path / "out", config)
