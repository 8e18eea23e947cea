"""Zero-shot LAMBADA / HellaSwag / PIQA scoring on tiny random decoders: equal to a hand computation,
independent of batching, equal through PyTorch and onnxruntime, and strict about its input files."""

from __future__ import annotations

import json
import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tiny import WORDS  # noqa: E402

from edgeprune.core.errors import EdgePruneError  # noqa: E402
from edgeprune.eval import zeroshot  # noqa: E402


def _sentence(rng, low=3, high=10):
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(low, high)))


def write_task_files(directory: Path, n: int = 8, seed: int = 0) -> dict[str, Path]:
    """Small files in each task's format, from the tiny vocabulary (so nothing is an unknown token)."""
    rng = random.Random(seed)
    rows = {
        "lambada": [{"text": _sentence(rng, 4, 14)} for _ in range(n)],
        "hellaswag": [{"idx": i, "activity_label": rng.choice(WORDS), "ctx": _sentence(rng) + ". " + _sentence(rng, 1, 3),
                       "endings": [_sentence(rng, 1, 8) for _ in range(4)], "label": rng.randrange(4)}
                      for i in range(n)],
        "piqa": [{"goal": _sentence(rng), "sol1": _sentence(rng, 1, 9), "sol2": _sentence(rng, 1, 9),
                  "label": rng.randrange(2)} for _ in range(n)],
    }
    paths = {}
    for task, items in rows.items():
        paths[task] = directory / f"{task}.jsonl"
        paths[task].write_text("".join(json.dumps(r) + "\n" for r in items))
    return paths


@pytest.fixture(scope="module")
def task_files(tmp_path_factory):
    return write_task_files(tmp_path_factory.mktemp("zeroshot-data"))


@pytest.fixture(scope="module")
def llama_backend(tiny_models):
    from edgeprune.eval.backends import TorchBackend
    from edgeprune.core.loading import load_model

    return TorchBackend(load_model(tiny_models("llama"), task="text-generation"))


def hand_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One request scored alone, straight from the model: lm-eval's recipe written out."""
    import torch

    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    cont = whole[len(ctx):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([whole[:-1]])).logits[0].double()
    logprobs = torch.log_softmax(logits, dim=-1)[len(ctx) - 1:]
    total = sum(float(logprobs[j, t]) for j, t in enumerate(cont))
    greedy = all(int(logprobs[j].argmax()) == t for j, t in enumerate(cont))
    return total, greedy


@pytest.mark.parametrize("task", zeroshot.ZERO_SHOT_TASKS)
def test_metrics_equal_a_hand_computation(task, task_files, llama_backend):
    rows = [json.loads(line) for line in task_files[task].read_text().splitlines()]
    model, tok = llama_backend.model, llama_backend.tokenizer
    if task == "lambada":
        lls, hits = [], []
        for row in rows:
            words = row["text"].split(" ")
            ll, greedy = hand_loglikelihood(model, tok, " ".join(words[:-1]), " " + words[-1])
            lls.append(ll)
            hits.append(greedy)
        expected = {"acc": float(np.mean(hits)), "perplexity": math.exp(-float(np.mean(lls)))}
    else:
        acc, acc_norm = [], []
        for row in rows:
            if task == "piqa":
                context, choices = f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]]
            else:
                # the tiny ctx is "words. words": capitalize() puts a capital on the fragment after ". "
                head, tail = row["ctx"].split(". ")
                context = f"{row['activity_label']}: {head}. {tail.capitalize()}"
                choices = row["endings"]
            lls = [hand_loglikelihood(model, tok, context, " " + c)[0] for c in choices]
            acc.append(int(np.argmax(lls)) == row["label"])
            acc_norm.append(int(np.argmax([ll / len(c) for ll, c in zip(lls, choices)])) == row["label"])
        expected = {"acc": float(np.mean(acc)), "acc_norm": float(np.mean(acc_norm))}
    items = zeroshot.read_items(task, task_files[task])
    result = zeroshot.evaluate_zero_shot(llama_backend, task, items, batch_size=5)
    assert result["n"] == len(rows)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, rel=1e-5), key
    assert result["value"] == result[zeroshot.HEADLINE[task]]


@pytest.mark.parametrize("task", zeroshot.ZERO_SHOT_TASKS)
def test_batching_gives_the_numbers_of_one_by_one(task, task_files, llama_backend):
    items = zeroshot.read_items(task, task_files[task])
    requests = zeroshot.item_requests(llama_backend, items, llama_backend.max_positions)
    alone = zeroshot.score_requests(llama_backend, requests, batch_size=1)
    batched = zeroshot.score_requests(llama_backend, requests, batch_size=16, batch_tokens=64)
    assert [g for _, g in alone] == [g for _, g in batched]
    np.testing.assert_allclose([s for s, _ in alone], [s for s, _ in batched], rtol=1e-5, atol=1e-5)
    assert zeroshot.metrics(task, items, alone) == pytest.approx(zeroshot.metrics(task, items, batched))


def test_batches_are_length_sorted_and_bounded():
    lengths = [5, 50, 7, 50, 6, 20]
    batches = zeroshot.plan_batches(lengths, batch_size=3, batch_tokens=100)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        widths = [lengths[i] for i in batch]
        assert widths == sorted(widths, reverse=True)
        assert len(batch) <= 3 and (len(batch) == 1 or len(batch) * widths[0] <= 100)
    assert batches[0] == [1, 3]  # 3 x 50 > 100 tokens: the third row waits for the next batch


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_torch_and_onnxruntime_agree(family, exported, task_files, tmp_path):
    from edgeprune.eval.api import EvalConfig, evaluate

    source, export_dir = exported(family, "text-generation")
    for task in zeroshot.ZERO_SHOT_TASKS:
        config = EvalConfig(task=task, batch_size=4)
        torch_result = evaluate(source, task_files[task], config, progress=False)
        ort_result = evaluate(export_dir, task_files[task], config, runtime="onnxruntime", threads=1, progress=False)
        assert ort_result["backend"] == "onnxruntime" and torch_result["backend"] == "pytorch"
        for key in ("acc", "acc_norm", "perplexity"):
            if key in torch_result:
                assert ort_result[key] == pytest.approx(torch_result[key], rel=1e-4), (task, key)


def test_encode_pair_moves_trailing_spaces_to_the_continuation():
    def encode(text):  # characters as tokens make the split visible
        return [ord(c) for c in text]

    ctx, cont = zeroshot.encode_pair(encode, "Answer: ", "yes")
    assert ctx == encode("Answer:") and cont == encode(" yes")
    assert zeroshot.encode_pair(encode, "", "yes", empty_context_id=7) == ([7], encode("yes"))
    with pytest.raises(EdgePruneError, match="empty context"):
        zeroshot.encode_pair(encode, "", "yes")


def test_lambada_splits_on_single_spaces_like_lm_eval(tmp_path):
    path = tmp_path / "l.jsonl"
    path.write_text(json.dumps({"text": "He said\n\nhello  there"}) + "\n")
    (item,) = zeroshot.read_items("lambada", path)
    assert item.context == "He said\n\nhello " and item.continuations == (" there",)


def test_hellaswag_query_forms():
    raw = {"activity_label": "Roof shingle removal", "ctx": "A man is sitting on a roof. he"}
    assert zeroshot.hellaswag_query(raw) == "Roof shingle removal: A man is sitting on a roof. He"
    split = {"activity_label": "Roof shingle removal", "ctx_a": "A man is sitting on a roof.", "ctx_b": "he"}
    assert zeroshot.hellaswag_query(split) == zeroshot.hellaswag_query(raw)
    prefixed = {"activity_label": "Roof", "ctx": "Roof: A man [title] stands. [step] He"}
    assert zeroshot.hellaswag_query(prefixed) == "Roof: A man. stands. He"
    wikihow = {"activity_label": "Family Life", "ctx_a": "[header] How to play [title] Ask the toddler.", "ctx_b": ""}
    assert zeroshot.hellaswag_query(wikihow) == "Family Life: How to play. Ask the toddler."


@pytest.mark.parametrize("task,line,why", [
    ("lambada", '{"txt": "a b"}', "no field 'text'"),
    ("lambada", '{"text": "single"}', "at least two words"),
    ("piqa", '{"goal": "g", "sol1": "a", "sol2": "b", "label": 2}', "label 2 out of range"),
    ("piqa", 'not json', "not JSON"),
    ("hellaswag", '{"activity_label": "x", "ctx": "c", "endings": "abcd", "label": 0}', "list of strings"),
    ("hellaswag", '["a", "b"]', "not a JSON object"),
])
def test_readers_name_the_expected_fields_and_the_first_bad_line(task, line, why, tmp_path, task_files):
    path = tmp_path / f"{task}.jsonl"
    good = task_files[task].read_text().splitlines()[0]
    path.write_text(good + "\n" + line + "\n" + line + "\n")
    with pytest.raises(EdgePruneError) as info:
        zeroshot.read_items(task, path)
    message = str(info.value)
    assert f"{path}:2:" in message and why in message and zeroshot.FIELDS[task] in message


def test_readers_reject_empty_files_and_bad_limits(tmp_path, task_files):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(EdgePruneError, match="empty file"):
        zeroshot.read_items("piqa", empty)
    with pytest.raises(EdgePruneError, match="--limit must be >= 1"):
        zeroshot.read_items("piqa", task_files["piqa"], limit=0)
    assert len(zeroshot.read_items("piqa", task_files["piqa"], limit=3)) == 3


def _cli(argv, capsys):
    from edgeprune.cli import main

    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_eval_json_and_errors(tiny_models, exported, task_files, tmp_path, capsys, monkeypatch):
    decoder = str(tiny_models("llama"))
    _, encoder_export = exported("bert", "feature-extraction")  # built before the loaders are stubbed out
    code, out, err = _cli(["eval", decoder, "--task", "piqa", "--data", str(task_files["piqa"]), "--limit", "4",
                           "--json"], capsys)
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    assert result["task"] == "piqa" and result["metric"] == "acc" and result["n"] == 4
    assert {"acc", "acc_norm", "acc_stderr", "acc_norm_stderr", "value"} <= set(result)

    # an encoder has no LM head: refused before its weights load
    import edgeprune.core.loading as models

    def no_load(*args, **kwargs):
        raise AssertionError("the model must not be loaded")

    monkeypatch.setattr(models, "load_model", no_load)
    for task in ("lambada", "hellaswag", "piqa", "perplexity"):
        data = task_files[task] if task in task_files else task_files["lambada"]
        code, _, err = _cli(["eval", str(tiny_models("bert")), "--task", task, "--data", str(data)], capsys)
        assert code == 2 and "needs a decoder with a language-model head" in err and len(err.splitlines()) == 1

    # an encoder export: refused from its manifest, before an onnxruntime session loads
    import edgeprune.runtime.pipelines as pipelines

    monkeypatch.setattr(pipelines, "load_session", no_load)
    for task in ("lambada", "hellaswag", "piqa"):
        code, _, err = _cli(["eval", str(encoder_export), "--task", task, "--data", str(task_files[task]),
                             "--runtime", "onnxruntime"], capsys)
        assert code == 2 and "needs a text-generation export" in err and len(err.splitlines()) == 1, err

    # bad data: one line, before the decoder loads (load_model is still the failing stand-in)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    blank = tmp_path / "blank.jsonl"
    blank.write_text("\n  \n")
    for argv, expected in [
        (["--data", str(empty)], "empty file"),
        (["--data", str(blank)], "empty file"),
        (["--data", str(task_files["piqa"]), "--limit", "0"], "--limit must be >= 1"),
        (["--data", str(task_files["piqa"]), "--limit", "-3"], "--limit must be >= 1"),
        (["--data", str(task_files["lambada"])], f"{task_files['lambada']}:1: not a piqa item"),
        (["--data", str(tmp_path / "missing.jsonl")], "data file not found"),
    ]:
        code, _, err = _cli(["eval", decoder, "--task", "piqa", *argv], capsys)
        assert code == 2 and expected in err and err.startswith("edgeprune: error:"), (argv, err)
        assert len(err.splitlines()) == 1, err
    # a file of another task's format names the fields this task expects
    code, _, err = _cli(["eval", decoder, "--task", "hellaswag", "--data", str(task_files["piqa"])], capsys)
    assert code == 2 and f"{task_files['piqa']}:1:" in err and zeroshot.FIELDS["hellaswag"] in err
    assert len(err.splitlines()) == 1, err
    monkeypatch.undo()


def test_bench_config_accepts_zero_shot_tasks():
    from edgeprune.bench.harness import BenchConfig

    assert BenchConfig(task="lambada").data is None  # the built-in lambada:dev is resolved by bench()
    with pytest.raises(EdgePruneError, match="--eval-limit"):
        BenchConfig(task="piqa", eval_limit=0)


def test_quality_ratio_of_accuracies():
    from edgeprune.bench.metrics import quality_ratio

    assert quality_ratio("acc_norm", 0.30, 0.40) == pytest.approx(0.75)


def test_bench_reports_zero_shot_quality(exported, task_files, tmp_path):
    from edgeprune.bench.api import bench
    from edgeprune.bench.harness import BenchConfig

    _, export_dir = exported("llama", "text-generation")
    config = BenchConfig(threads=1, rounds=1, warmup=0, round_seconds=0.01, seqs=(8,), new_tokens=2,
                         task="piqa", data=str(task_files["piqa"]), eval_limit=6)
    report = bench(str(export_dir), [str(export_dir)], tmp_path / "report", config, log=lambda *_: None)
    qualities = [m["quality"] for m in report["models"]]
    assert all(q["metric"] == "acc" and q["n"] == 6 and "acc_norm" in q for q in qualities)
    assert qualities[0]["value"] == qualities[1]["value"] > 0
    assert report["comparisons"][0]["quality_ratio"] == pytest.approx(1.0)


# --- the LM head at the scored positions only (target_logits) -----------------------------------------------
def _padded_batch(seed: int = 0, rows: int = 4, vocab: int = 128):
    """A right-padded batch of uneven rows, and every (row, position) of its real tokens."""
    rng = np.random.default_rng(seed)
    lengths = [9, 7, 4, 1][:rows]
    ids = np.zeros((rows, max(lengths)), dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, :n] = rng.integers(7, vocab, n)
        mask[row, :n] = 1
    at_rows = np.concatenate([np.full(n, row) for row, n in enumerate(lengths)])
    positions = np.concatenate([np.arange(n) for n in lengths])
    order = rng.permutation(len(at_rows))  # any order, as a caller may ask
    return ids, mask, at_rows[order], positions[order]


class _FullLogitsOnly:
    """A backend without target_logits: the scorer's full-logits path."""

    def __init__(self, backend):
        self._backend = backend
        self.batch_logits = backend.batch_logits


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_target_logits_equal_full_logits_torch_and_onnxruntime(family, exported, tiny_models):
    from edgeprune.eval.backends import TorchBackend
    from edgeprune.core.loading import load_model
    from edgeprune.eval.backends import RuntimeBackend

    source, export_dir = exported(family, "text-generation")
    ids, mask, rows, positions = _padded_batch()
    torch_backend = TorchBackend(load_model(source, task="text-generation"))
    assert torch_backend._head_split() is not None  # the fast path is what is tested
    ort_backend = RuntimeBackend(export_dir, "onnxruntime", threads=1)
    try:
        for backend in (torch_backend, ort_backend):
            full = backend.batch_logits(ids, mask)[rows, positions]
            fast = backend.target_logits(ids, mask, rows, positions)
            assert fast.shape == full.shape
            np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5)
        assert ort_backend._head and ort_backend._head[0] is not ort_backend.session  # the headless graph ran
        assert "logits" not in {o.name for o in ort_backend._head[0].outputs}
    finally:
        ort_backend.close()


@pytest.mark.parametrize("task", zeroshot.ZERO_SHOT_TASKS)
def test_scores_through_target_logits_equal_the_full_logits_path(task, exported, task_files):
    from edgeprune.eval.backends import RuntimeBackend

    _, export_dir = exported("llama", "text-generation")
    backend = RuntimeBackend(export_dir, "onnxruntime", threads=1)
    try:
        fast, full = _fast_and_full_scores(backend, task, task_files[task])
    finally:
        backend.close()
    _assert_same_scores(fast, full)


def _fast_and_full_scores(backend, task, path):
    """The task's scores through target_logits and through the full-logits path of the same backend."""
    items = zeroshot.read_items(task, path)
    requests = zeroshot.item_requests(backend, items, backend.max_positions)
    return (zeroshot.score_requests(backend, requests, batch_size=8),
            zeroshot.score_requests(_FullLogitsOnly(backend), requests, batch_size=8))


def _assert_same_scores(fast, full):
    assert [g for _, g in fast] == [g for _, g in full]
    np.testing.assert_allclose([s for s, _ in fast], [s for s, _ in full], rtol=1e-6, atol=1e-5)


@pytest.fixture(scope="module")
def weight_only_exports(tiny_models, tmp_path_factory):
    """Factory: the tiny llama exported with --quantize int4-weight / int8-weight (MatMulNBits LM head)."""
    import warnings

    from edgeprune.exporters.api import ExportConfig, export

    cache = {}

    def get(quantize: str):
        if quantize not in cache:
            out = tmp_path_factory.mktemp(f"export-llama-{quantize}")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                cache[quantize] = export(tiny_models("llama"), out, ExportConfig(quantize=quantize, gate_tokens=256),
                                         overwrite=True, progress=False)
        return cache[quantize]

    return get


@pytest.mark.parametrize("quantize", ["int4-weight", "int8-weight"])
def test_weight_only_head_runs_only_at_the_scored_positions(quantize, weight_only_exports, task_files):
    """A MatMulNBits head is split too: the headless graph, then the same quantized head node on the picked
    rows; logits, scores and greedy decisions equal the export's full-logits graph."""
    from edgeprune.eval.backends import RuntimeBackend

    export_dir = weight_only_exports(quantize)
    backend = RuntimeBackend(export_dir, "onnxruntime", threads=1)
    try:
        ids, mask, rows, positions = _padded_batch()
        full = backend.batch_logits(ids, mask)[rows, positions]
        fast = backend.target_logits(ids, mask, rows, positions)
        np.testing.assert_allclose(fast, full, rtol=1e-5, atol=1e-5)
        hidden_session, split, head_session = backend._head
        assert split.weight is None and head_session is not None  # the quantized-head path is what ran
        assert "logits" not in {o.name for o in hidden_session.outputs}
        assert [i.name for i in head_session.inputs] == [split.hidden]
        assert [o.name for o in head_session.outputs] == ["logits"]
        fast_scores, full_scores = _fast_and_full_scores(backend, "lambada", task_files["lambada"])
    finally:
        backend.close()
    _assert_same_scores(fast_scores, full_scores)


def _linear_head_model(path: Path, head: str):
    """A two-node graph: hidden = Relu(x), logits = hidden @ W (+ b), in the forms torch.onnx writes."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 10)).astype(np.float32)
    bias = rng.standard_normal(10).astype(np.float32)
    nodes = [helper.make_node("Relu", ["input_ids_f"], ["hidden"])]
    inits = []
    if head == "transpose":  # W stored as [V, H] (a tied embedding) behind a Transpose
        inits.append(numpy_helper.from_array(weight.T.copy(), "embed"))
        nodes += [helper.make_node("Transpose", ["embed"], ["embed_t"], perm=[1, 0]),
                  helper.make_node("MatMul", ["hidden", "embed_t"], ["logits"])]
    elif head == "bias":
        inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(bias, "b")]
        nodes += [helper.make_node("MatMul", ["hidden", "w"], ["mm"]), helper.make_node("Add", ["mm", "b"], ["logits"])]
    else:  # a scaled head: not a plain MatMul, so it must not be split
        inits += [numpy_helper.from_array(weight, "w"), numpy_helper.from_array(np.float32([2.0]), "scale")]
        nodes += [helper.make_node("MatMul", ["hidden", "w"], ["mm"]),
                  helper.make_node("Mul", ["mm", "scale"], ["logits"])]
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("input_ids_f", TensorProto.FLOAT, [2, 3, 6])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [2, 3, 10])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return weight, bias


@pytest.mark.parametrize("quantize", ["int4-weight", "int8-weight"])
def test_split_lm_head_of_a_weight_only_export(quantize, weight_only_exports):
    from edgeprune.runtime.lm_head import split_lm_head

    split = split_lm_head(weight_only_exports(quantize) / "model.onnx")
    assert split is not None and split.weight is None
    assert [n.op_type for n in split.head_model.graph.node] == ["MatMulNBits"]
    assert "logits" not in {o.name for o in split.model.graph.output}
    # the packed head weight left the headless graph (a tied embedding's Gather table stays, separately)
    head_inits = {i.name for i in split.head_model.graph.initializer}
    assert head_inits and not head_inits & {i.name for i in split.model.graph.initializer}


@pytest.mark.parametrize("head", ["transpose", "bias", "scaled"])
def test_split_lm_head_forms(head, tmp_path):
    import onnxruntime as ort

    from edgeprune.runtime.lm_head import save_split, split_lm_head

    weight, bias = _linear_head_model(tmp_path / "m.onnx", head)
    split = split_lm_head(tmp_path / "m.onnx")
    if head == "scaled":
        assert split is None
        return
    x = np.random.default_rng(2).standard_normal((2, 3, 6)).astype(np.float32)
    full = ort.InferenceSession(str(tmp_path / "m.onnx")).run(["logits"], {"input_ids_f": x})[0]
    path = save_split(split, tmp_path)
    hidden = ort.InferenceSession(str(path)).run([split.hidden], {"input_ids_f": x})[0]
    logits = hidden @ split.weight + (split.bias if split.bias is not None else 0)
    np.testing.assert_allclose(logits, full, rtol=1e-6, atol=1e-6)
    assert (split.bias is not None) == (head == "bias")
    assert [n.op_type for n in split.model.graph.node] == ["Relu"]  # the head's nodes and weight are gone
    assert not list(split.model.graph.initializer)
