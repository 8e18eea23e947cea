"""Exports on the runtime side: hashes checked on load, position limits checked up front, eval defaults to
onnxruntime for exports, reports read from the export itself, DeepSparse roles honest (issue 13, items 8,
12, 20, 24, 25)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

from edgeprune.cli import main
from edgeprune.core.errors import EdgePruneError


def error_lines(err):
    return [line for line in err.strip().splitlines() if line.strip() and not line.startswith("[")]


def sts_file(path):
    rows = [("a man plays guitar", "a man plays music"), ("the dog runs", "a cat sits"),
            ("a child rides a horse", "the child rides"), ("red car", "blue car")]
    path.write_text("".join(f"g\tf\t2012\t{i:04d}\t{i % 5}.0\t{a}\t{b}\n" for i, (a, b) in enumerate(rows)))
    return path


def test_tampered_export_is_refused_on_load(exported, tmp_path, capsys):
    """Item 25: a modified file is named in one line by run, eval and verify."""
    _, export = exported("bert", "feature-extraction")
    copy = tmp_path / "copy"
    shutil.copytree(export, copy)
    with open(copy / "model.onnx", "r+b") as handle:
        handle.seek(-8, 2)
        handle.write(b"tampered")
    assert main(["run", str(copy), "--text", "a man plays guitar"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "model.onnx: SHA-256 differs" in lines[0] and "edgeprune verify" in lines[0]
    assert main(["eval", str(copy), "--task", "sts", "--data", str(sts_file(tmp_path / "s.tsv"))]) == 2
    assert "model.onnx: SHA-256 differs" in capsys.readouterr().err
    assert main(["verify", str(copy)]) == 2


def test_eval_of_an_export_defaults_to_onnxruntime(exported, tmp_path, capsys):
    """Item 24: no --runtime: an export directory runs on onnxruntime (PyTorch cannot load it)."""
    _, export = exported("bert", "feature-extraction")
    assert main(["eval", str(export), "--task", "sts", "--data", str(sts_file(tmp_path / "s.tsv")), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["backend"] == "onnxruntime" and result["n"] == 4


def test_positions_are_checked_up_front_and_generation_keeps_its_text(exported, capsys):
    """Item 20: --max-length past the position table is refused before running; generation that would
    run past it stops there, says so, and keeps what it produced."""
    from edgeprune.runtime.pipelines import build_pipeline

    _, encoder = exported("bert", "feature-extraction")
    assert main(["run", str(encoder), "--text", "a man", "--max-length", "1000"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "--max-length 1000 exceeds the 128 token positions" in lines[0]
    _, decoder = exported("llama", "text-generation")
    pipeline = build_pipeline(decoder)
    prompt = pipeline.tokenizer.encode("the man plays the guitar")
    ids = pipeline.generate_ids(prompt, 500, stop_on_eos=False)
    assert len(prompt) + len(ids) == 128 and pipeline.stopped_at_limit == 128
    with pytest.raises(EdgePruneError, match="shorten it"):
        pipeline.generate_ids(list(range(7, 7 + 128)), 1)
    pipeline.session.close()


def test_report_numbers_come_from_the_export_itself(exported, tmp_path):
    """Item 25: params and FLOPs are the same without transformers and without the parent artifact."""
    from edgeprune.bench.metrics import analytic_flops, model_size
    from edgeprune.core.anatomy import analytic_flops as torch_flops
    from edgeprune.core.loading import load_model

    source, export = exported("bert", "feature-extraction")
    loaded = load_model(source)
    config, adapter = loaded.model.config, loaded.adapter
    expected = {str(s): torch_flops(adapter, config, adapter.shapes(config), s) for s in (16, 128)}
    assert analytic_flops(export, (16, 128))["per_sequence"] == expected
    script = ("import sys, json\nclass Block:\n    def find_spec(self, name, path=None, target=None):\n"
              "        if name.split('.')[0] in ('torch', 'transformers'):\n            raise ImportError(name)\n"
              "sys.meta_path.insert(0, Block())\nfrom pathlib import Path\n"
              "from edgeprune.bench.metrics import analytic_flops, model_size\n"
              f"d = Path({str(export)!r})\n"
              "print(json.dumps([analytic_flops(d, (16, 128)), model_size(d, d / 'model.onnx')['parameters']]))")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    flops, parameters = json.loads(result.stdout)
    assert flops["per_sequence"] == expected
    assert parameters == model_size(export, export / "model.onnx")["parameters"] == sum(
        p.numel() for p in loaded.model.parameters())


def test_artifact_without_the_head_is_refused(tiny_models, tmp_path, capsys):
    """Item 8, artifacts: a feature-extraction artifact has no trained classifier to export."""
    from edgeprune.compress.api import CompressConfig, compress

    artifact = compress(tiny_models("bert"), tmp_path / "a", CompressConfig.from_dict({"structured": {"heads": 0.5}}))
    assert main(["export", str(artifact), "-o", str(tmp_path / "o"), "--task", "sequence-classification"]) == 2
    lines = error_lines(capsys.readouterr().err)
    assert len(lines) == 1 and "no trained sequence-classification head" in lines[0]
    assert not (tmp_path / "o").exists()


def test_deepsparse_roles_are_honest(exported, tiny_models, tmp_path, capsys, monkeypatch):
    """Item 12: a KV decoder cannot target DeepSparse; int8-dynamic is not DeepSparse-capable; a missing
    DeepSparse is said on stderr, not only in the manifest."""
    from onnx import TensorProto, helper

    from edgeprune.exporters import api
    from edgeprune.runtime import deepsparse_adapter

    assert main(["export", str(tiny_models("gpt2")), "-o", str(tmp_path / "d"), "--target", "deepsparse"]) == 2
    assert "--no-past" in capsys.readouterr().err
    with pytest.raises(EdgePruneError, match="int8-static"):
        api.ExportConfig(target="deepsparse", quantize="int8-dynamic")
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert any("DynamicQuantizeLinear" in p for p in deepsparse_adapter.deepsparse_ready(model))
    _, decoder = exported("llama", "text-generation")
    assert json.loads((decoder / "manifest.json").read_text())["files_by_role"]["deepsparse"] is None
    monkeypatch.setattr(deepsparse_adapter, "deepsparse_python", lambda: None)
    assert main(["export", str(tiny_models("bert")), "-o", str(tmp_path / "e"), "--target", "deepsparse"]) == 0
    assert "warning: model.onnx was not compile-checked with DeepSparse" in capsys.readouterr().err
