"""Runtime adapters and pipelines against PyTorch on tiny exported models."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from tiny import sample_texts

from edgeprune.core.errors import EdgePruneError
from edgeprune.runtime.base import get_runtime, runtime_names
from edgeprune.eval.backends import RuntimeBackend
from edgeprune.runtime.pipelines import ClassificationPipeline, GenerationPipeline, build_pipeline, sample_next

TEXTS = sample_texts(6, seed=3) + ["the dog runs in the park", "a"]


def torch_model(source, task):
    from edgeprune.core.loading import load_model

    return load_model(str(source), task=task)


# --- import hygiene ----------------------------------------------------------------------------------------
BLOCKER = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum'):
            raise ImportError('blocked for the test: ' + name)
sys.meta_path.insert(0, Block())
"""


def test_runtime_imports_and_runs_without_torch(exported):
    _, export = exported("bert", "feature-extraction")
    code = BLOCKER + f"""
import edgeprune.runtime, edgeprune.runtime.base, edgeprune.runtime.pipelines, edgeprune.runtime.tokenizer
import edgeprune.runtime.onnxruntime_adapter, edgeprune.runtime.deepsparse_adapter, edgeprune.runtime.cli
from edgeprune.cli import main
code = main(['run', {str(export)!r}, '--text', 'the dog runs', '--json'])
assert code == 0, code
assert not any(m.split('.')[0] in ('torch', 'transformers') for m in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["n"] == 1 and len(summary["results"][0]) == 32


# --- parity with PyTorch --------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", ["bert", "distilbert"])
def test_embeddings_match_torch(exported, family):
    from edgeprune.eval.backends import TorchBackend

    source, export = exported(family, "feature-extraction")
    reference = TorchBackend(torch_model(source, "feature-extraction"), max_length=16).embed(TEXTS)
    backend = RuntimeBackend(export, "onnxruntime", max_length=16, threads=1)
    got = backend.embed(TEXTS)
    backend.close()
    assert got.shape == reference.shape
    np.testing.assert_allclose(got, reference, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)


def test_classification_probabilities_match_torch(exported):
    import torch

    source, export = exported("bert", "sequence-classification")
    loaded = torch_model(source, "sequence-classification")
    batch = loaded.tokenizer(TEXTS, padding=True, truncation=True, max_length=16, return_tensors="pt")
    with torch.no_grad():
        reference = torch.softmax(loaded.model(**batch).logits, -1).numpy()
    pipeline = build_pipeline(export, "onnxruntime", max_length=16)
    assert isinstance(pipeline, ClassificationPipeline)
    probs = pipeline(TEXTS)
    np.testing.assert_allclose(probs, reference, atol=1e-5)
    assert pipeline.labels == ["LABEL_0", "LABEL_1"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_kv_cache_greedy_generation_equals_torch(exported, family):
    import torch

    source, export = exported(family, "text-generation")
    loaded = torch_model(source, "text-generation")
    pipeline = build_pipeline(export, "onnxruntime")
    assert isinstance(pipeline, GenerationPipeline) and pipeline.past_inputs
    prompt = "the man plays the guitar"
    ids = pipeline.tokenizer.encode(prompt)
    assert ids == loaded.tokenizer(prompt)["input_ids"]
    with torch.no_grad():
        out = loaded.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                    max_new_tokens=24, do_sample=False, eos_token_id=None, pad_token_id=0)
    expected = out[0, len(ids):].tolist()
    assert pipeline.generate_ids(ids, 24, stop_on_eos=False) == expected
    text = pipeline(prompt, 24, stop_on_eos=False)
    assert text == loaded.tokenizer.decode(expected, skip_special_tokens=True)


def test_runtime_logits_match_torch(exported):
    import torch

    source, export = exported("llama", "text-generation")
    loaded = torch_model(source, "text-generation")
    ids = np.array([[7, 8, 9, 10, 11, 12, 30, 40]], dtype=np.int64)
    backend = RuntimeBackend(export, "onnxruntime")
    with torch.no_grad():
        reference = loaded.model(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()
    np.testing.assert_allclose(backend.logits(ids), reference, atol=1e-4)
    assert backend.encode("the dog") == loaded.tokenizer("the dog", add_special_tokens=False)["input_ids"]


def test_sampling_is_seeded_and_filters(exported):
    _, export = exported("llama", "text-generation")
    pipeline = build_pipeline(export, "onnxruntime")
    ids = pipeline.tokenizer.encode("the cat sits")
    greedy = pipeline.generate_ids(ids, 10, stop_on_eos=False)
    a = pipeline.generate_ids(ids, 10, do_sample=True, top_p=0.9, seed=5, stop_on_eos=False)
    b = pipeline.generate_ids(ids, 10, do_sample=True, top_p=0.9, seed=5, stop_on_eos=False)
    assert a == b
    assert pipeline.generate_ids(ids, 10, do_sample=True, top_k=1, seed=1, stop_on_eos=False) == greedy
    assert pipeline.generate_ids(ids, 10, do_sample=True, top_p=1e-6, seed=2, stop_on_eos=False) == greedy
    # top-k keeps exactly the k best tokens
    logits = np.array([0.0, 5.0, 4.0, -1.0])
    draws = {sample_next(logits, np.random.default_rng(s), True, top_k=2) for s in range(50)}
    assert draws == {1, 2}


def test_generation_stops_on_eos(exported):
    _, export = exported("llama", "text-generation")
    pipeline = build_pipeline(export, "onnxruntime")
    ids = pipeline.tokenizer.encode("the cat sits")
    first = pipeline.generate_ids(ids, 5, stop_on_eos=False)
    pipeline.tokenizer.eos_ids = [first[2]]
    assert pipeline.generate_ids(ids, 5)[-1] == first[2]
    assert len(pipeline.generate_ids(ids, 5)) == first.index(first[2]) + 1


# --- sessions ---------------------------------------------------------------------------------------------------
def test_onnxruntime_session_metadata_and_benchmark(exported):
    _, export = exported("bert", "feature-extraction")
    session = get_runtime("onnxruntime").load(str(export), threads=1, optimization="basic")
    assert [i.name for i in session.inputs] == ["input_ids", "attention_mask", "token_type_ids"]
    assert session.outputs[0].name == "last_hidden_state" and session.outputs[0].dtype == "float32"
    feeds = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64),
             "token_type_ids": np.zeros((2, 5), np.int64)}
    times = session.benchmark(feeds, iterations=4, warmup=1)
    assert len(times) == 4 and all(t > 0 for t in times)
    assert session.run(feeds)["last_hidden_state"].shape == (2, 5, 32)
    session.close()


def test_error_cases(exported, tmp_path, monkeypatch):
    _, export = exported("bert", "feature-extraction")
    with pytest.raises(EdgePruneError, match="unknown runtime"):
        get_runtime("tensorrt")
    assert runtime_names() == ["deepsparse", "llamacpp", "onnxruntime"]
    session = get_runtime("onnxruntime").load(str(export))
    with pytest.raises(EdgePruneError, match="missing model inputs: attention_mask"):
        session.run({"input_ids": np.ones((1, 3), np.int64), "token_type_ids": np.zeros((1, 3), np.int64)})
    with pytest.raises(EdgePruneError, match="unknown onnxruntime options"):
        get_runtime("onnxruntime").load(str(export), turbo=True)
    with pytest.raises(EdgePruneError, match="graph optimisation level"):
        get_runtime("onnxruntime").load(str(export), optimization="max")
    with pytest.raises(EdgePruneError, match="not found"):
        build_pipeline(tmp_path / "nope")
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(EdgePruneError, match="onnxruntime cannot load"):
        get_runtime("onnxruntime").load(str(tmp_path / "bad.onnx"))
    # An encoder cannot be used for generation-only calls.
    with pytest.raises(EdgePruneError, match="no 'logits' output"):
        RuntimeBackend(export, "onnxruntime").logits(np.ones((1, 3), np.int64))


def test_missing_deepsparse_env_is_one_clear_line(exported, tmp_path):
    _, export = exported("bert", "feature-extraction")
    env = dict(os.environ, EDGEPRUNE_DEEPSPARSE_PYTHON=str(tmp_path / "no-python"))
    result = subprocess.run([sys.executable, "-m", "edgeprune.cli", "run", str(export), "--runtime", "deepsparse",
                             "--text", "hi"], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "edgeprune runtime install deepsparse" in lines[0], result.stderr
    listing = subprocess.run([sys.executable, "-m", "edgeprune.cli", "runtime", "list", "--json"],
                             capture_output=True, text=True, env=env, timeout=120)
    rows = {r["name"]: r for r in json.loads(listing.stdout.strip().splitlines()[-1])["runtimes"]}
    assert rows["onnxruntime"]["available"] and not rows["deepsparse"]["available"]
    assert "install deepsparse" in rows["deepsparse"]["reason"]


def test_cli_run_input_file_and_generation(exported, tmp_path, capsys):
    from edgeprune.cli import main

    _, encoder = exported("bert", "feature-extraction")
    lines = tmp_path / "in.txt"
    lines.write_text("\n".join(TEXTS[:5]) + "\n\n")
    assert main(["run", str(encoder), "--input", str(lines), "--batch-size", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["n"] == 5 and np.allclose(np.linalg.norm(summary["results"], axis=1), 1, atol=1e-4)
    _, decoder = exported("llama", "text-generation")
    assert main(["run", str(decoder), "--text", "the dog", "--max-new-tokens", "6", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "GenerationPipeline" and isinstance(summary["results"][0], str)
    assert main(["run", str(decoder), "--input", str(tmp_path / "missing.txt")]) == 2


# --- deepsparse ---------------------------------------------------------------------------------------------------
@pytest.mark.deepsparse
def test_deepsparse_matches_onnxruntime_and_torch(exported, deepsparse_runtime):
    from edgeprune.eval.backends import TorchBackend

    source, export = exported("bert", "feature-extraction")
    reference = TorchBackend(torch_model(source, "feature-extraction"), max_length=16).embed(TEXTS)
    backend = RuntimeBackend(export, "deepsparse", max_length=16, threads=1)
    try:
        np.testing.assert_allclose(backend.embed(TEXTS), reference, atol=1e-4)
        session = backend.session
        feeds = {"input_ids": np.ones((2, 5), np.int64), "attention_mask": np.ones((2, 5), np.int64),
                 "token_type_ids": np.zeros((2, 5), np.int64)}
        ort = get_runtime("onnxruntime").load(str(export)).run(feeds)["last_hidden_state"]
        np.testing.assert_allclose(session.run(feeds)["last_hidden_state"], ort, atol=1e-4)
        times = session.benchmark(feeds, iterations=3, warmup=1)
        assert len(times) == 3 and all(t > 0 for t in times)
        with pytest.raises(EdgePruneError, match="missing model inputs"):
            session.run({"input_ids": feeds["input_ids"]})
        # The worker survives a failed request and the artifact file is untouched by shape overrides.
        assert session.run(feeds)["last_hidden_state"].shape == (2, 5, 32)
    finally:
        backend.close()
    from edgeprune.core.artifacts import read_manifest, sha256_file

    assert read_manifest(export)["files"]["model.onnx"] == sha256_file(export / "model.onnx")


class _StaticShapeSession:
    """An onnxruntime session that claims static shapes and records the shapes it was fed, standing in for
    DeepSparse (which compiles an engine per shape)."""

    static_shapes = True

    def __init__(self, session):
        self.session, self.inputs, self.outputs, self.shapes = session, session.inputs, session.outputs, set()

    def run(self, feeds, output_names=None):
        self.shapes.add(tuple(v.shape for v in feeds.values()))
        return self.session.run(feeds, output_names)


def test_fixed_capacity_cache_generates_like_the_dynamic_cache(exported):
    _, export = exported("llama", "text-generation")
    dynamic = build_pipeline(export, "onnxruntime")
    static = GenerationPipeline(_StaticShapeSession(dynamic.session), dynamic.tokenizer, dynamic.info)
    assert static.fixed_capacity and not dynamic.fixed_capacity
    for prompt, steps in (("the man plays the guitar", 24), ("a", 5), (" ".join(TEXTS[:3]), 40)):
        ids = dynamic.tokenizer.encode(prompt)
        assert static.generate_ids(ids, steps, stop_on_eos=False) == dynamic.generate_ids(ids, steps, stop_on_eos=False)
    # per generation: one padded-prompt shape and one one-token shape
    assert len(static.session.shapes) <= 2 * 3


def _no_past_llama(tiny_models, out, target="onnxruntime"):
    from edgeprune.exporters.api import ExportConfig, export

    return export(str(tiny_models("llama")), out, ExportConfig(with_past=False, target=target), progress=False)


def test_static_shape_no_past_decoder_is_right_padded_to_the_bucket(tiny_models, tmp_path):
    """A cache-less decoder on a static-shape session gets every sequence right-padded to a multiple of 16
    (DeepSparse 1.8 segfaults on Llama graphs under 16 tokens); logits, batched logits and generation stay
    those of the unpadded run."""
    dynamic = build_pipeline(_no_past_llama(tiny_models, tmp_path / "np"), "onnxruntime")
    static = GenerationPipeline(_StaticShapeSession(dynamic.session), dynamic.tokenizer, dynamic.info)
    ids = np.asarray([dynamic.tokenizer.encode("the man plays the guitar")])
    np.testing.assert_allclose(static.logits(ids), dynamic.logits(ids), atol=1e-5)
    batch = np.zeros((2, 7), np.int64)
    batch[0], batch[1, :3] = np.arange(3, 10), [4, 5, 6]
    mask = (batch > 0).astype(np.int64)
    np.testing.assert_allclose(static.batch_logits(batch, mask), dynamic.batch_logits(batch, mask), atol=1e-5)
    prompt = list(ids[0])
    assert static.generate_ids(prompt, 6, stop_on_eos=False) == dynamic.generate_ids(prompt, 6, stop_on_eos=False)
    assert {shape[0][1] % 16 for shape in static.session.shapes} == {0}


@pytest.mark.deepsparse
def test_deepsparse_runs_a_rewritten_no_past_llama_like_onnxruntime(tiny_models, tmp_path, deepsparse_runtime):
    """--target deepsparse --no-past: the rotary rewrite plus right-padding to 16 tokens make the Llama graph
    run on DeepSparse 1.8 itself (prompts of 3 tokens included), with onnxruntime's logits."""
    export = _no_past_llama(tiny_models, tmp_path / "ds", target="deepsparse")
    reference = build_pipeline(export, "onnxruntime")
    pipeline = build_pipeline(export, "deepsparse")
    try:
        for text in ("the man", "the man plays the guitar and the dog runs in the park"):
            ids = np.asarray([reference.tokenizer.encode(text)])
            np.testing.assert_allclose(pipeline.logits(ids), reference.logits(ids), atol=1e-4)
        prompt = reference.tokenizer.encode("a dog")
        assert pipeline.generate_ids(prompt, 3, stop_on_eos=False) == reference.generate_ids(prompt, 3, stop_on_eos=False)
    finally:
        pipeline.session.close()


class _OrtEngine:
    """onnxruntime posing as a compiled DeepSparse engine (positional arrays in, positional outputs out)."""

    def __init__(self, session, input_names):
        self.session, self.input_names, self.shapes = session, input_names, []

    def run(self, arrays, val_inp=False):
        self.shapes.append(tuple(a.shape for a in arrays))
        return self.session.run(None, dict(zip(self.input_names, arrays)))


def test_deepsparse_worker_decode_timings_decodes_like_the_growing_cache(exported):
    """The DeepSparse worker's in-process decode loop (what `edgeprune bench` times on DeepSparse) in its
    fixed-capacity layout picks the tokens onnxruntime's growing-cache decode picks, with two engine shapes."""
    import onnx

    from edgeprune.core.onnxio import ort_session
    from edgeprune.runtime import deepsparse_worker

    _, export = exported("llama", "text-generation")
    worker = deepsparse_worker.Worker()
    model = onnx.load(str(export / "model.onnx"))
    worker.inputs = [deepsparse_worker._value_info(v) for v in model.graph.input]
    worker.outputs = [deepsparse_worker._value_info(v) for v in model.graph.output]
    engine = _OrtEngine(ort_session(export / "model.onnx"), [name for name, _, _ in worker.inputs])
    worker.engine_for = lambda arrays: engine
    reference = build_pipeline(export, "onnxruntime")
    prompt = reference.tokenizer.encode("the man plays the guitar")
    layout = [[row["kv_heads"], row["head_dim"]] for row in json.loads((export / "manifest.json").read_text())["kv_layout"]]
    reply = worker.decode_timings(np.asarray([prompt]), 12, 64, layout)
    tokens = reference.generate_ids(prompt, 13, stop_on_eos=False)
    assert reply["checksum"] == sum(tokens[1:])
    assert len(reply["steps"]) == 12 and reply["prefill"] > 0
    assert len({shape for shape in engine.shapes}) == 2
    with pytest.raises(ValueError, match="capacity 16 does not hold"):
        worker.decode_timings(np.asarray([prompt]), 12, 16, layout)
    worker.tempdir.cleanup()


@pytest.mark.deepsparse
def test_deepsparse_kv_decoding_crash_is_one_line_naming_the_signal(tiny_models, tmp_path, deepsparse_runtime):
    """With its rotary Concat(x, x) rewritten (--target deepsparse) the Llama KV graph compiles and prefills on
    DeepSparse 1.8, and then its engine segfaults on the one-token decode step with a past (this tiny Llama's
    shapes run only from 16 tokens; SmolLM2-135M decodes, benchmarks/RESULTS.md). DeepSparse's handler catches the signal and exits 1; the user
    gets one line naming the signal, not a hang or the report's support address."""
    from edgeprune.exporters.api import ExportConfig, export

    out = export(str(tiny_models("llama")), tmp_path / "ds", ExportConfig(target="deepsparse"), progress=False)
    pipeline = build_pipeline(out, "deepsparse")
    try:
        assert pipeline.fixed_capacity
        with pytest.raises(EdgePruneError, match=r"^the DeepSparse worker died \(exit code 1\): DeepSparse 1.8 crashed: Segmentation fault$"):
            pipeline.generate_ids(pipeline.tokenizer.encode("the man plays the guitar"), 4, stop_on_eos=False)
    finally:
        pipeline.session.close()
