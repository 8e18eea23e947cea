"""Depth-pruned models exported: ONNX (fewer blocks; FFN-free blocks; encoders with half-blocks; attention-free
decoders refused) and GGUF (``llama`` with a smaller block_count; ``deci`` with attention-free and FFN-free
layers), the llama.cpp files loaded back and compared with PyTorch (marked ``llamacpp``)."""

from __future__ import annotations

import numpy as np
import pytest

from edgeprune.core.artifacts import read_manifest
from edgeprune.cli import main
from edgeprune.compress.api import CompressConfig, StructuredConfig, compress
from edgeprune.compress.depth import DepthConfig
from edgeprune.exporters.api import ExportConfig, export
from edgeprune.core.ggufio import GGUF_FILE, export_loaded, read_gguf_metadata
from edgeprune.core.loading import load_model
from test_gguf_export import make_bpe_llama
from tiny import gguf_vs_torch_logits, make_tiny, ort_vs_torch, sample_texts

HALF = DepthConfig(drop_layers=(1,), drop_attn=(2,), drop_ffn=(4,))  # the last block FFN-free on purpose


@pytest.fixture(scope="module")
def bpe5(tmp_path_factory):
    return make_bpe_llama(tmp_path_factory.mktemp("bpe5"), layers=5)


@pytest.fixture(scope="module")
def artifacts(bpe5, tmp_path_factory):
    """whole: 2 blocks removed; half: a block, an attention and an FFN removed (plus width pruning)."""
    root = tmp_path_factory.mktemp("depth-artifacts")
    whole = compress(bpe5, root / "whole", CompressConfig(depth=DepthConfig(drop_layers=(1, 3))))
    half = compress(bpe5, root / "half", CompressConfig(structured=StructuredConfig(ffn=0.25), depth=HALF))
    return {"whole": whole, "half": half}


def test_gguf_metadata_and_tensors(artifacts, tmp_path):
    for which, arch in (("whole", "llama"), ("half", "deci")):
        loaded = load_model(artifacts[which])
        path = tmp_path / f"{which}.gguf"
        info = export_loaded(loaded, path, "f32", progress=False)
        fields, tensors = read_gguf_metadata(path, tensors=True)
        names = {name for name, _, _ in tensors}
        assert info["architecture"] == arch and fields["general.architecture"][0] == arch
        if which == "whole":
            assert fields["llama.block_count"][0] == 3 and not any(n.startswith("blk.3.") for n in names)
            continue
        assert fields["deci.block_count"][0] == 4
        assert fields["deci.attention.head_count"][0] == [4, 0, 4, 4]
        assert fields["deci.attention.head_count_kv"][0] == [2, 0, 2, 2]
        assert fields["deci.feed_forward_length"][0] == [96, 96, 96, 1]  # FFN-free: the 1-neuron zero stub
        assert fields["deci.attention.key_length"][0] == 16
        assert not any(n.startswith("blk.1.attn") for n in names) and "blk.1.ffn_up.weight" in names
        assert "blk.3.attn_q.weight" in names and "blk.3.ffn_down.weight" in names


def test_attention_free_first_block_is_refused_for_gguf(bpe5, tmp_path, capsys):
    art = compress(bpe5, tmp_path / "a0", CompressConfig(depth=DepthConfig(drop_attn=(0,))))
    code = main(["export", str(art), "-o", str(tmp_path / "g"), "--target", "llamacpp", "--quantize", "f32"])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[export]")]  # progress
    assert code != 0 and len(err) == 1 and "block 0 has no attention" in err[0]
    assert not (tmp_path / "g").exists()


@pytest.mark.llamacpp
@pytest.mark.parametrize("which,qtype", [("whole", "q8_0"), ("half", "f32"), ("half", "q8_0")])
def test_gguf_loads_in_llamacpp_with_matching_logits(artifacts, llamacpp_runtime, which, qtype, tmp_path):
    out = export(artifacts[which], tmp_path / "g", ExportConfig(target="llamacpp", quantize=qtype), progress=False)
    manifest = read_manifest(out)
    assert manifest["validation"][qtype]["passed"]
    assert manifest["variants"][0]["architecture"] == ("llama" if which == "whole" else "deci")
    got, ref = gguf_vs_torch_logits(llamacpp_runtime, artifacts[which], out / GGUF_FILE)
    tolerance = {"f32": 2e-3, "q8_0": 5e-2}[qtype]
    assert np.abs(got - ref).max() <= tolerance * max(1.0, np.abs(ref).max())
    assert (got.argmax(-1) == ref.argmax(-1)).mean() >= 0.9


# --- ONNX ------------------------------------------------------------------------------------------------------
def test_onnx_decoder_with_fewer_and_ffn_free_blocks(tmp_path):
    source = make_tiny("llama", tmp_path / "src", layers=4)
    art = compress(source, tmp_path / "a", CompressConfig(depth=DepthConfig(drop_layers=(1,), drop_ffn=(2,))))
    out = export(art, tmp_path / "o", progress=False)
    manifest = read_manifest(out)
    assert manifest["validation"]["fp32"]["passed"] and len(manifest["kv_layout"]) == 3


def test_onnx_encoder_with_half_blocks(tmp_path):

    source = make_tiny("bert", tmp_path / "src", layers=4)
    art = compress(source, tmp_path / "a", CompressConfig(depth=DepthConfig(drop_layers=(0,), drop_attn=(1,),
                                                                            drop_ffn=(3,))))
    out = export(art, tmp_path / "o", progress=False)
    assert read_manifest(out)["validation"]["fp32"]["passed"]
    assert ort_vs_torch(out, art, sample_texts(3)) < 1e-4


def test_onnx_refuses_attention_free_decoder_in_one_line(tmp_path, capsys):
    source = make_tiny("llama", tmp_path / "src", layers=3)
    art = compress(source, tmp_path / "a", CompressConfig(depth=DepthConfig(drop_attn=(1,))))
    code = main(["export", str(art), "-o", str(tmp_path / "o")])
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[export]")]  # progress
    assert code != 0 and len(err) == 1 and "block(s) 1 have no attention" in err[0] and "--target llamacpp" in err[0]
    assert not (tmp_path / "o").exists()
