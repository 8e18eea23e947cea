"""Validation gates: ONNX (through onnxruntime) against PyTorch or against another ONNX file.

Numerical gate: fresh random inputs at several batch / sequence / past lengths, max abs and relative error per
output. Task gate (quantized encoders and classifiers): embedding cosine or top-1 agreement against the fp32
export; quantized decoders use the perplexity / greedy gate in ``decoder_gate``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.onnxio import (check_onnx_model, has_past, mean_pool_normalize, ort_greedy, ort_session,
                                   prompt_feeds, random_feeds, run_session)

# (batch, sequence, past) shapes the numerical gate runs; the last encoder row of each batch is padded.
ENCODER_SHAPES = ((1, 8, 0), (2, 13, 0), (3, 5, 0))
DECODER_SHAPES = ((1, 6, 0), (2, 5, 0), (2, 3, 7), (1, 1, 9))


def check_onnx_file(path: str | Path) -> Any:
    """Load and check an ONNX file; a corrupt or truncated one becomes one clear error."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise EdgePruneError(f"ONNX file not found: {path}")
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # protobuf DecodeError and friends: the file is not an ONNX model
        raise EdgePruneError(f"{path}: not a readable ONNX model (corrupt or truncated: "
                             f"{exc.__class__.__name__})") from None
    try:
        check_onnx_model(model, path)
    except onnx.checker.ValidationError as exc:
        raise EdgePruneError(f"{path}: invalid ONNX model ({str(exc).splitlines()[0]})") from None
    if not model.graph.node:
        raise EdgePruneError(f"{path}: ONNX model has an empty graph (truncated?)")
    return model


# --- references ----------------------------------------------------------------------------------------------
def torch_reference(model) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """feeds (ONNX names) -> outputs (ONNX names) computed by the PyTorch model."""
    import torch

    def run(feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        kwargs: dict[str, Any] = {k: torch.from_numpy(v) for k, v in feeds.items()
                                  if k in ("input_ids", "attention_mask", "token_type_ids", "position_ids")}
        pasts = sorted((k for k in feeds if k.startswith("past_key_values.")), key=lambda k: int(k.split(".")[1]))
        decoder = bool(pasts)
        if decoder:
            from transformers import DynamicCache

            layers = len(pasts) // 2
            kwargs["past_key_values"] = DynamicCache(ddp_cache_data=[
                (torch.from_numpy(feeds[f"past_key_values.{i}.key"]), torch.from_numpy(feeds[f"past_key_values.{i}.value"]))
                for i in range(layers)])
            kwargs["use_cache"] = True
        with torch.no_grad():
            out = model(**kwargs)
        result = {}
        if getattr(out, "logits", None) is not None:
            result["logits"] = out.logits.numpy()
        else:
            result["last_hidden_state"] = out.last_hidden_state.numpy()
        if decoder:
            for i, layer in enumerate(out.past_key_values.layers):
                result[f"present.{i}.key"] = layer.keys.numpy()
                result[f"present.{i}.value"] = layer.values.numpy()
        return result

    return run


def onnx_reference(path: str | Path) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    session = ort_session(path)
    return lambda feeds: run_session(session, feeds)


def compare(reference: dict[str, np.ndarray], candidate: dict[str, np.ndarray],
            mask: np.ndarray | None = None) -> dict[str, dict[str, float]]:
    """Max abs error and max abs error relative to the reference's largest magnitude, per output.

    ``mask`` (batch, seq) drops padded positions of sequence outputs: their values are undefined."""
    errors = {}
    for name, ref in reference.items():
        if name not in candidate:
            raise EdgePruneError(f"exported model lacks output {name!r} (has {sorted(candidate)})")
        got = candidate[name]
        if got.shape != ref.shape:
            raise EdgePruneError(f"output {name}: shape {got.shape} from ONNX, {ref.shape} from the reference")
        diff = np.abs(got.astype(np.float64) - ref.astype(np.float64))
        scale = np.abs(ref.astype(np.float64))
        if mask is not None and not name.startswith("present.") and diff.ndim >= 2 and diff.shape[:2] == mask.shape:
            keep = mask.astype(bool)
            diff, scale = diff[keep], scale[keep]
        if not np.isfinite(diff).all():
            errors[name] = {"max_abs": float("inf"), "max_rel": float("inf")}
            continue
        max_abs = float(diff.max()) if diff.size else 0.0
        errors[name] = {"max_abs": max_abs, "max_rel": max_abs / max(float(scale.max()) if scale.size else 0.0, 1e-12)}
    return errors


def numeric_gate(candidate_path: str | Path, reference: Callable, vocab_size: int, layout, decoder: bool,
                 atol: float, rtol: float, seed: int = 1234, type_vocab: int = 2, what: str = "PyTorch") -> dict[str, Any]:
    """Run the candidate ONNX and the reference on fresh random inputs; raise beyond tolerance."""
    session = ort_session(candidate_path)
    names = [i.name for i in session.get_inputs()]
    with_past = any(n.startswith("past_key_values.") for n in names)
    shapes = DECODER_SHAPES if decoder else ENCODER_SHAPES
    if decoder and not with_past:
        shapes = tuple((b, s, 0) for b, s, p in shapes if p == 0)
    rng = np.random.default_rng(seed)
    worst: dict[str, dict[str, float]] = {}
    cases = []
    for batch, seq, past in shapes:
        feeds = random_feeds(names, batch, seq, past, vocab_size, layout, rng, type_vocab, pad_last=not decoder)
        errors = compare(reference(feeds), run_session(session, feeds),
                         mask=None if decoder else feeds.get("attention_mask"))
        cases.append({"batch": batch, "sequence": seq, "past": past,
                      "max_abs": max(e["max_abs"] for e in errors.values())})
        for name, err in errors.items():
            # Present tensors are many; report them as one worst entry.
            key = "present.*" if name.startswith("present.") else name
            prev = worst.get(key, {"max_abs": 0.0, "max_rel": 0.0})
            worst[key] = {k: max(prev[k], err[k]) for k in prev}
    failed = {name: err for name, err in worst.items() if err["max_abs"] > atol and err["max_rel"] > rtol}
    report = {"reference": what, "atol": atol, "rtol": rtol, "outputs": worst, "cases": cases, "passed": not failed}
    if failed:
        detail = ", ".join(f"{n}: max abs {e['max_abs']:.3g}, rel {e['max_rel']:.3g}" for n, e in failed.items())
        raise EdgePruneError(f"{Path(candidate_path).name} does not match {what} (tolerance abs {atol:g} / rel {rtol:g}): {detail}")
    return report


# --- decoders: greedy generation with the KV cache ---------------------------------------------------------------
def torch_greedy(model, prompt: np.ndarray, steps: int) -> list[int]:
    import torch

    with torch.no_grad():
        out = model.generate(torch.from_numpy(prompt.reshape(1, -1).astype(np.int64)),
                             attention_mask=torch.ones((1, prompt.size), dtype=torch.long),
                             max_new_tokens=steps, min_new_tokens=steps, do_sample=False, num_beams=1,
                             use_cache=True, pad_token_id=model.config.pad_token_id or 0)
    return out[0, prompt.size:].tolist()


def generation_gate(path: str | Path, model, layout, vocab_size: int, steps: int = 8, prompts: int = 2,
                    seed: int = 99) -> dict[str, Any]:
    """Greedy tokens through ORT with KV cache must equal torch ``generate`` token for token."""
    session = ort_session(path)
    if not has_past(i.name for i in session.get_inputs()):
        return {"skipped": "exported without KV cache"}
    rng = np.random.default_rng(seed)
    for _ in range(prompts):
        prompt = rng.integers(0, vocab_size, size=int(rng.integers(3, 9)), dtype=np.int64)
        ours, theirs = ort_greedy(session, prompt, steps, layout), torch_greedy(model, prompt, steps)
        if ours != theirs:
            raise EdgePruneError(f"{Path(path).name}: greedy generation through onnxruntime differs from PyTorch "
                                 f"(onnxruntime {ours}, torch {theirs})")
    return {"steps": steps, "prompts": prompts, "match": True}


def ort_logits_fn(path: str | Path, layout: list[dict[str, int]] | None) -> Callable[[np.ndarray], np.ndarray]:
    """ids [1, T] -> logits [1, T, V] through an exported decoder (empty past when it has a KV cache)."""
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]

    def logits(ids: np.ndarray) -> np.ndarray:
        return session.run(["logits"], prompt_feeds(np.asarray(ids).reshape(1, -1), names, layout))[0]

    return logits


# --- quantized files: task-level agreement ------------------------------------------------------------------------
def mean_cosine(reference: np.ndarray, candidate: np.ndarray, mask: np.ndarray) -> float:
    a, b = mean_pool_normalize(reference, mask), mean_pool_normalize(candidate, mask)
    return float((a * b).sum(axis=1).mean())


def task_gate(candidate_path: str | Path, reference_path: str | Path, task: str, batches: list[dict[str, np.ndarray]],
              min_cosine: float, min_top1: float) -> dict[str, Any]:
    """Embeddings: mean cosine of mean-pooled outputs; classifiers and decoders: top-1 agreement."""
    ref_session, cand_session = ort_session(reference_path), ort_session(candidate_path)
    cosines, agree, count, max_abs = [], 0, 0, 0.0
    for feeds in batches:
        ref, cand = run_session(ref_session, feeds), run_session(cand_session, feeds)
        mask = feeds["attention_mask"][:, -feeds["input_ids"].shape[1]:]
        if task == "feature-extraction":
            cosines.append(mean_cosine(ref["last_hidden_state"], cand["last_hidden_state"], mask))
            max_abs = max(max_abs, float(np.abs(ref["last_hidden_state"] - cand["last_hidden_state"]).max()))
            continue
        r, c = ref["logits"].argmax(-1), cand["logits"].argmax(-1)
        if task == "text-generation":  # every real position predicts a next token
            keep = mask.astype(bool)
            agree += int((r[keep] == c[keep]).sum())
            count += int(keep.sum())
        else:
            agree += int((r == c).sum())
            count += r.size
        max_abs = max(max_abs, float(np.abs(ref["logits"] - cand["logits"]).max()))
    if task == "feature-extraction":
        value = float(np.mean(cosines))
        report = {"metric": "mean_cosine", "value": value, "threshold": min_cosine, "max_abs": max_abs}
        passed = value >= min_cosine
    else:
        value = agree / max(count, 1)
        report = {"metric": "top1_agreement", "value": value, "threshold": min_top1, "tokens": count,
                  "max_abs": max_abs}
        passed = value >= min_top1
    report["passed"] = passed
    if not passed:
        raise EdgePruneError(f"{Path(candidate_path).name}: {report['metric']} {value:.4f} against the fp32 export "
                             f"is below the threshold {report['threshold']}")
    return report
