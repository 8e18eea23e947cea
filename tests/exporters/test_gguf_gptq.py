"""GPTQ for GGUF files (exporters/gguf_gptq.py): Hessians gathered through PyTorch, tensors rounded onto
llama.cpp's grids with less output error than the gguf package's round-to-nearest, and ``auto`` resolved
before any slow work."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.ggufio import GGUF_FILE, export_loaded, permute_rope
from edgeprune.core.loading import load_model
from edgeprune.exporters.api import ExportConfig
from edgeprune.exporters.gguf_api import weight_algorithm
from edgeprune.exporters.gguf_gptq import GGUFGPTQ, linear_hessians
from test_gguf_export import make_bpe_llama
from tiny import sample_texts


@pytest.fixture(scope="module")
def bpe_llama(tmp_path_factory):
    return make_bpe_llama(tmp_path_factory.mktemp("bpe-llama-gptq"))


def _windows(tokenizer, count=12, length=32):
    ids = tokenizer(" ".join(sample_texts(200, seed=5)), add_special_tokens=False)["input_ids"]
    return np.asarray(ids[:count * length], dtype=np.int64).reshape(count, length)


def test_hessians_match_a_manual_capture_and_are_shared_by_linears_reading_one_input(bpe_llama):
    import torch

    loaded = load_model(bpe_llama)
    windows = _windows(loaded.tokenizer)
    hessians, tokens = linear_hessians(loaded.model, windows, progress=False)
    assert tokens == windows.size
    layer = "model.layers.1"
    attn, mlp = f"{layer}.self_attn", f"{layer}.mlp"
    assert hessians[f"{attn}.q_proj.weight"] is hessians[f"{attn}.k_proj.weight"] is hessians[f"{attn}.v_proj.weight"]
    assert hessians[f"{mlp}.gate_proj.weight"] is hessians[f"{mlp}.up_proj.weight"]
    assert hessians[f"{mlp}.down_proj.weight"].shape == (128, 128)
    captured = []
    module = loaded.model.model.layers[1].mlp.down_proj
    handle = module.register_forward_pre_hook(lambda m, args: captured.append(args[0].reshape(-1, 128).double()))
    with torch.no_grad():
        loaded.model(input_ids=torch.as_tensor(windows), use_cache=False)
    handle.remove()
    rows = torch.cat(captured)
    np.testing.assert_allclose(hessians[f"{mlp}.down_proj.weight"], (rows.T @ rows).numpy(), rtol=1e-4, atol=1e-4)


def _dequantized(path):
    import gguf

    return {t.name: gguf.dequantize(np.asarray(t.data), t.tensor_type).reshape(tuple(int(d) for d in reversed(t.shape)))
            for t in gguf.GGUFReader(str(path)).tensors}


def test_gptq_file_moves_every_layers_output_less_than_round_to_nearest(bpe_llama, tmp_path):
    loaded = load_model(bpe_llama)
    hessians, tokens = linear_hessians(loaded.model, _windows(loaded.tokenizer), progress=False)
    quantizer = GGUFGPTQ(hessians, tokens, "sample text")
    info = export_loaded(loaded, tmp_path / "gptq.gguf", "q4_0", progress=False, quantizer=quantizer)
    export_loaded(loaded, tmp_path / "rtn.gguf", "q4_0", progress=False)
    assert len(quantizer.quantized) == info["tensor_types"]["q4_0"] == 14  # 7 per block; the tied table is q8_0
    assert quantizer.record()["calibration_tokens"] == tokens
    ours, rtn = _dequantized(tmp_path / "gptq.gguf"), _dequantized(tmp_path / "rtn.gguf")
    np.testing.assert_array_equal(ours["token_embd.weight"], rtn["token_embd.weight"])  # no Hessian: RTN
    params = dict(loaded.model.named_parameters())
    worse = []
    for i in range(2):
        for gguf_name, hf_name, heads in ((f"blk.{i}.attn_q.weight", f"model.layers.{i}.self_attn.q_proj.weight", 4),
                                          (f"blk.{i}.attn_v.weight", f"model.layers.{i}.self_attn.v_proj.weight", 0),
                                          (f"blk.{i}.ffn_down.weight", f"model.layers.{i}.mlp.down_proj.weight", 0)):
            weight = params[hf_name].detach().numpy()
            weight = permute_rope(weight, heads) if heads else weight
            h = hessians[hf_name].astype(np.float64)
            cost = {kind: np.einsum("ij,jk,ik->", d := files[gguf_name] - weight, h, d)
                    for kind, files in (("gptq", ours), ("rtn", rtn))}
            worse += [gguf_name] if cost["gptq"] >= cost["rtn"] else []
    assert not worse, f"GPTQ's output error is not below RTN's for {worse}"


def test_auto_is_resolved_before_the_load_and_explicit_gptq_fails_where_it_cannot_run(tmp_path, monkeypatch):
    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(20)))
    said = []
    config = ExportConfig(target="llamacpp", quantize="q4_0", calib=str(calib))
    assert weight_algorithm(config, "q4_0", False, said.append) == ("gptq", str(calib))
    assert weight_algorithm(config.replace(quantize="q8_0"), "q8_0", False, said.append) == ("rtn", None)
    explicit = config.replace(weight_algorithm="gptq")
    assert weight_algorithm(explicit.replace(quantize="q8_0"), "q8_0", False, said.append) == ("gptq", str(calib))
    assert weight_algorithm(config.replace(weight_algorithm="rtn"), "q4_0", False, said.append) == ("rtn", None)
    assert not said
    assert weight_algorithm(config, "q4_0", True, said.append) == ("rtn", None)
    assert said and "needs the model in memory" in said[-1]
    for bad, qtype, match in ((explicit, "q4_0", "drop --streaming"), (explicit, "f16", "f16 has no grid"),
                              (config.replace(weight_algorithm="hqq"), "q4_0", "hqq is for ONNX")):
        with pytest.raises(EdgePruneError, match=match):
            weight_algorithm(bad, qtype, qtype == "q4_0" and bad is explicit, said.append)

    def unreachable(ref, **kwargs):
        raise EdgePruneError(f"{ref}: not found")

    monkeypatch.setattr("edgeprune.core.data_sources.resolve_data", unreachable)
    no_text = config.replace(calib=None)
    assert weight_algorithm(no_text, "q4_0", False, said.append) == ("rtn", None)
    assert "no calibration text" in said[-1] and "--calib PATH" in said[-1]
    with pytest.raises(EdgePruneError, match="gptq needs calibration text"):
        weight_algorithm(no_text.replace(weight_algorithm="gptq"), "q4_0", False, said.append)


@pytest.mark.llamacpp
def test_gptq_q4_0_export_validates_in_llamacpp_and_records_its_calibration(bpe_llama, llamacpp_runtime, tmp_path):
    from edgeprune.core.artifacts import read_manifest
    from edgeprune.exporters.api import export

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(sample_texts(300, seed=9)))
    out = export(bpe_llama, tmp_path / "out", ExportConfig(target="llamacpp", quantize="q4_0", calib=str(calib),
                                                           gptq_windows=16, gptq_window_tokens=32), progress=False)
    manifest = read_manifest(out)
    record = manifest["variants"][0]["weight_algorithm"]
    assert record["algorithm"] == "gptq" and record["tensors"] == 14 and record["calibration_tokens"] == 16 * 32
    assert manifest["config"]["weight_algorithm"] == "gptq" and manifest["validation"]["q4_0"]["passed"]
    assert (out / GGUF_FILE).is_file()


def test_a_4_bit_lm_head_is_the_tied_table_rounded_by_gptq_with_the_heads_own_hessian(bpe_llama, tmp_path):
    from edgeprune.core.ggufio import iter_gguf_shapes
    from edgeprune.exporters.gguf_api import lm_head_type

    config = ExportConfig(target="llamacpp", quantize="q4_0")
    assert lm_head_type(config, "q4_0") is None
    assert [lm_head_type(config.replace(lm_head_bits=b), "q4_0") for b in (8, 4, 0)] == ["q8_0", "q4_0", "f16"]
    with pytest.raises(EdgePruneError, match="--lm-head-bits 4 .* q8_0 has none"):
        lm_head_type(config.replace(lm_head_bits=4), "q8_0")
    loaded = load_model(bpe_llama)
    windows = _windows(loaded.tokenizer)
    without, _ = linear_hessians(loaded.model, windows, progress=False)
    hessians, tokens = linear_hessians(loaded.model, windows, progress=False, lm_head=True)
    assert "lm_head.weight" not in without and "model.embed_tokens.weight" not in without
    assert hessians["model.embed_tokens.weight"] is hessians["lm_head.weight"]
    np.testing.assert_allclose(hessians["model.layers.0.mlp.down_proj.weight"],
                               without["model.layers.0.mlp.down_proj.weight"], rtol=1e-6)
    quantizer = GGUFGPTQ(hessians, tokens, "sample text")
    export_loaded(loaded, tmp_path / GGUF_FILE, "q4_0", progress=False, quantizer=quantizer, head_type="q4_0")
    types = {name: t for name, _, t in iter_gguf_shapes(tmp_path / GGUF_FILE)}
    assert types["token_embd.weight"] == "Q4_0" and "model.embed_tokens.weight" in quantizer.quantized
