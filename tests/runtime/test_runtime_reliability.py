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
from edgeprune.core.artifacts import onnx_model_path
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
    """Item 12: a KV decoder gets a DeepSparse file (fixed-capacity cache decoding); int8-dynamic is not
    DeepSparse-capable; a missing DeepSparse is said on stderr, not only in the manifest."""
    from onnx import TensorProto, helper

    from edgeprune.exporters import api
    from edgeprune.runtime import deepsparse_adapter

    monkeypatch.setattr(deepsparse_adapter, "deepsparse_python", lambda: None)  # compiled in test_runtime.py
    assert main(["export", str(tiny_models("gpt2")), "-o", str(tmp_path / "d"), "--target", "deepsparse"]) == 0
    assert json.loads((tmp_path / "d" / "manifest.json").read_text())["files_by_role"]["deepsparse"] == "model.onnx"
    capsys.readouterr()
    with pytest.raises(EdgePruneError, match="int8-static"):
        api.ExportConfig(target="deepsparse", quantize="int8-dynamic")
    graph = helper.make_graph([helper.make_node("DynamicQuantizeLinear", ["x"], ["q", "s", "z"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("q", TensorProto.UINT8, [2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    assert any("DynamicQuantizeLinear" in p for p in deepsparse_adapter.deepsparse_ready(model))
    _, decoder = exported("llama", "text-generation")  # its rotary Concat(x, x) aborts DeepSparse's compiler
    assert json.loads((decoder / "manifest.json").read_text())["files_by_role"]["deepsparse"] is None
    assert main(["export", str(tiny_models("llama")), "-o", str(tmp_path / "l"), "--target", "deepsparse"]) == 0
    manifest = json.loads((tmp_path / "l" / "manifest.json").read_text())
    assert manifest["files_by_role"]["deepsparse"] == "model_dense.onnx"
    rewrite_check = manifest["validation"]["deepsparse_rewrites"]
    assert rewrite_check["concat_to_tile"] >= 1 and rewrite_check["passed"] and rewrite_check["max_abs_vs_source"] <= 1e-5
    with pytest.raises(EdgePruneError, match=r"no ONNX file for deepsparse .*re-export with --target deepsparse"):
        onnx_model_path(decoder, "deepsparse")
    assert main(["export", str(tiny_models("bert")), "-o", str(tmp_path / "e"), "--target", "deepsparse"]) == 0
    assert "warning: model.onnx was not compile-checked with DeepSparse" in capsys.readouterr().err


def test_deepsparse_form_tiles_a_self_concat_without_changing_its_output(tmp_path):
    """Concat(x, x) (Llama's rotary cat((freqs, freqs), -1)) aborts DeepSparse 1.8's compiler; Tile computes the
    same tensor and compiles."""
    import numpy as np
    import onnx
    from onnx import TensorProto, helper

    from edgeprune.core.onnxio import ort_session
    from edgeprune.runtime.deepsparse_adapter import deepsparse_form, deepsparse_ready

    nodes = [helper.make_node("Mul", ["x", "x"], ["f"]), helper.make_node("Concat", ["f", "f"], ["y"], axis=-1),
             helper.make_node("Concat", ["x", "f"], ["z"], axis=0)]  # two different inputs: left alone
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None),
                               helper.make_tensor_value_info("z", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    path = tmp_path / "g.onnx"
    onnx.save(model, str(path))
    before = ort_session(path).run(None, {"x": x})
    assert any("concatenates a tensor with itself" in p for p in deepsparse_ready(model))
    assert deepsparse_form(model) == {"concat_to_tile": 1}
    assert [n.op_type for n in model.graph.node] == ["Mul", "Tile", "Concat"]
    assert not any("concatenates" in p for p in deepsparse_ready(model))
    onnx.save(model, str(path))
    after = ort_session(path).run(None, {"x": x})
    assert after[0].shape == (2, 3, 8)
    for want, got in zip(before, after):
        np.testing.assert_array_equal(got, want)
    assert deepsparse_form(model) == {"concat_to_tile": 0}


def test_deepsparse_crash_reason_names_the_assertion():
    from edgeprune.runtime.deepsparse_adapter import crash_reason

    report = ("DeepSparse, Copyright ...\nArch: x86_64\n\nAssertion at src/lib/engine/execution/graph.cpp:925\n\n"
              "Backtrace:\n 0# wand::detail::assert_fail(...)\nPlease email a copy of this stack trace and any "
              "additional information to: support@neuralmagic.com\n")
    assert crash_reason(report) == "DeepSparse 1.8 aborted: Assertion at src/lib/engine/execution/graph.cpp:925"
    caught = ("Thread: 0x7f1a65ffb6c0\n\nReceived signal: Segmentation fault (signal addr: 0000000000000000)\n\n"
              "Registers:\nRAX = 00007f1a6c200a40\n\nPlease email a copy of this stack trace and any additional "
              "information to: support@neuralmagic.com\n\n")
    assert crash_reason(caught) == "DeepSparse 1.8 crashed: Segmentation fault"
    assert crash_reason("loading\nValueError: bad shape\n") == "ValueError: bad shape"
    assert crash_reason("ValueError: bad input\n") == "ValueError: bad input"
    assert crash_reason("") == "no message"


def test_deepsparse_worker_exit_names_the_killing_signal():
    from edgeprune.runtime.deepsparse_adapter import exit_description

    assert exit_description(-11) == "killed by SIGSEGV"
    assert exit_description(-6) == "killed by SIGABRT"
    assert exit_description(3) == "exit code 3"
