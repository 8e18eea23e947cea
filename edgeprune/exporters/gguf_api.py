"""``edgeprune export --target llamacpp``: model or compressed artifact -> validated ``model.gguf``.

The GGUF file is loaded back in llama.cpp (the ``llamacpp`` runtime) and compared with the PyTorch model:
logits on a short window (max abs error, top-1 agreement) and the decoder quality gate
(``decoder_gate``: perplexity ratio on calibration tokens, greedy agreement along PyTorch's greedy path),
with tolerances per GGUF type (``GATE``). A failing file is never written to ``out``.
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeprune.core.artifacts import staged_output, write_manifest
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.ggufio import GGUF_FILE, check_gguf_type, export_tensors

# (max perplexity ratio vs PyTorch fp32, min greedy agreement over 32 tokens) per GGUF type, on the gate's
# tokens. Measured on SmolLM2-135M (docs/llamacpp.md, "GGUF gate tolerances"): q4_0 ratio 1.141, greedy
# agreement 0.969 -- and llama.cpp's own Q4_0 of the same source scores the same perplexity to 4 decimals, so
# that is the format's cost, which the old 1.15 bound passed with under 1 % to spare. 4-bit bounds are 1.25:
# room for other texts and models, still far below what a broken file gives (a wrong Q/K permutation or head
# layout: ratios > 10). The 8/16/32-bit and 5-bit bounds are not yet measured on a real model (tiny random
# Llamas in the tests: f32/f16/q8_0 pass with greedy agreement >= 0.9).
GATE = {"f32": (1.005, 0.9), "f16": (1.01, 0.9), "bf16": (1.02, 0.85), "q8_0": (1.02, 0.85),
        "q5_1": (1.08, 0.7), "q5_0": (1.08, 0.7), "q4_1": (1.25, 0.6), "q4_0": (1.25, 0.6)}
GATE_TOKENS = 1024
GATE_WINDOW = 512
LOGITS_TOKENS = 64
GATE_BATCH = 256  # llama.cpp batch size while validating
# Calibration text when no --calib is given: the *end* of WikiText-2 valid (docs report perplexity on its
# beginning), else random token ids.
DEFAULT_GATE_TEXT = "wikitext-2/valid.txt"


def gate_tokens(tokenizer, calib: str | None, vocab_size: int, seed: int) -> tuple[np.ndarray, str]:
    from edgeprune.core.datasets import read_corpus
    from edgeprune.core.paths import data_dir

    if calib:
        text, where = read_corpus(calib), calib
        ids = tokenizer(text[: 40 * GATE_TOKENS], add_special_tokens=False)["input_ids"][:GATE_TOKENS]
    else:
        path = data_dir() / DEFAULT_GATE_TEXT
        if path.is_file():
            text = read_corpus(path)
            ids = tokenizer(text[-40 * GATE_TOKENS:], add_special_tokens=False)["input_ids"][-GATE_TOKENS:]
            where = f"{path} (last {GATE_TOKENS} tokens)"
        else:
            rng = np.random.default_rng(seed)
            return rng.integers(0, vocab_size, size=GATE_TOKENS, dtype=np.int64), "random token ids"
    if len(ids) < 64:
        raise EdgePruneError(f"{where}: fewer than 64 tokens of calibration text")
    return np.asarray(ids, dtype=np.int64), where


def torch_logits(model):
    import torch

    def run(ids: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return model(input_ids=torch.from_numpy(np.asarray(ids, dtype=np.int64))).logits.float().numpy()

    return run


def validate_gguf(path: Path, model: "GGUFInput", qtype: str, config, threads: int | None = None) -> dict[str, Any]:
    from edgeprune.compress.lazy_weights import release_memory
    from edgeprune.exporters.decoder_gate import decoder_quality_gate, gate_bounds, reference_run
    from edgeprune.runtime.base import get_runtime
    from edgeprune.runtime.llamacpp_adapter import DEFAULT_CONTEXT, build_flags

    started = time.perf_counter()
    vocab = int(model.config.vocab_size)
    context = min(DEFAULT_CONTEXT, int(getattr(model.config, "max_position_embeddings", 0) or DEFAULT_CONTEXT))
    ids, where = gate_tokens(model.tokenizer, config.calib, vocab, config.seed)
    ids = ids[: max(64, min(len(ids), context))]
    short = ids[None, :LOGITS_TOKENS]
    window, prompt = min(GATE_WINDOW, context, len(ids)), min(32, len(ids) // 2)
    greedy_tokens = min(32, context - prompt)
    # The reference's side first, then llama.cpp: for a streamed (large) model the block-by-block reference
    # and llama.cpp's copy of the file are then never in memory together.
    ref = model.reference(short)
    ref_run = reference_run(model.reference, ids, window=window, greedy_prompt_len=prompt, greedy_tokens=greedy_tokens)
    release_memory()
    # Not mapped: a mapped file's pages stay resident beside llama.cpp's repacked copy of the weights (a q4_0
    # file then counts twice in the RSS). A context of the gate's longest call and 256-token batches: KV cache
    # and compute buffers sized for 2,048 / 512 added 0.24 GB to a 3 B model's validation (measured).
    needed = max(window, prompt + greedy_tokens, short.shape[1])
    session = get_runtime("llamacpp").load(str(path), threads=threads or os.cpu_count(), use_mmap=False,
                                           n_ctx=needed, n_batch=GATE_BATCH)
    try:
        if session.vocab_size != vocab:
            raise EdgePruneError(f"llama.cpp reads {session.vocab_size} tokens from {path.name}, the model has {vocab}")
        if session.n_ctx < needed:
            raise EdgePruneError(f"llama.cpp opens {path.name} with {session.n_ctx} positions, fewer than the "
                                 f"{needed} the gate needs")
        got = session.logits(short)
        max_abs = float(np.abs(ref - got).max())
        scale = float(np.abs(ref).max())
        logits = {"tokens": int(short.shape[1]), "max_abs": max_abs, "max_abs_relative": max_abs / max(scale, 1e-12),
                  "top1_agreement": float((ref.argmax(-1) == got.argmax(-1)).mean())}
        max_ratio, min_greedy = gate_bounds(config, GATE[qtype])
        gate = decoder_quality_gate(ref_run, session.logits, ids, window=window, greedy_prompt_len=prompt,
                                    greedy_tokens=greedy_tokens, max_ppl_ratio=max_ratio,
                                    min_greedy_agreement=min_greedy)
        gate["data"] = where
        tokenizer = _tokenizer_check(model.tokenizer, session)
    finally:
        session.close()
    reference_kind = "PyTorch fp32, block by block (streaming)" if model.streaming else "PyTorch fp32"
    return {"reference": reference_kind, "runtime": "llamacpp", "llamacpp_build": build_flags(), "logits": logits,
            "decoder_gate": gate, "tokenizer": tokenizer, "passed": bool(gate["passed"]),
            "seconds": round(time.perf_counter() - started, 2)}


SAMPLE_TEXT = "The quick brown fox jumps over the lazy dog. It was 1999, and prices rose 3.5% — naïve café!"


def _tokenizer_check(tokenizer, session) -> dict[str, Any]:
    """Do llama.cpp and the Hugging Face tokenizer split a sample text the same way? (Reported: a mismatch
    means llama.cpp prompts tokenize differently from the model's own tokenizer.)"""
    hf = list(tokenizer(SAMPLE_TEXT, add_special_tokens=False)["input_ids"])
    ours = session.encode(SAMPLE_TEXT, add_special_tokens=False)
    return {"text": SAMPLE_TEXT, "same_ids": hf == ours, "hf_tokens": len(hf), "llamacpp_tokens": len(ours)}


@dataclass(frozen=True)
class GGUFInput:
    """What the GGUF export reads: the model in memory, or (``streaming``) a checkpoint on disk read one tensor
    at a time, with a block-by-block PyTorch reference for the gate."""

    config: Any
    adapter: Any
    tokenizer: Any
    source: Any  # edgeprune.core.loading.ModelSource
    reference: Callable[[np.ndarray], np.ndarray]  # ids [1, T] -> float32 logits [1, T, V]
    tensors: Callable[[], tuple]  # () -> (read(hf_name) -> float32 array, {hf_name: shape})
    streaming: bool
    module: Any = None  # the torch model when it is in memory (GPTQ's calibration pass runs it)


def in_memory_input(loaded) -> GGUFInput:
    from edgeprune.core.ggufio import model_tensors

    return GGUFInput(loaded.model.config, loaded.adapter, loaded.tokenizer, loaded.source, torch_logits(loaded.model),
                     lambda: model_tensors(loaded.model), streaming=False, module=loaded.model)


def streaming_input(source) -> GGUFInput:
    """``source`` (a resolved ``ModelSource``): a compressed artifact or a local Hugging Face directory with
    safetensors; nothing but its config, tokenizer and shard headers is read here."""
    import transformers

    from edgeprune.compress.sequential import BlockwiseLogits
    from edgeprune.core.loading import prepare_tokenizer
    from edgeprune.core.model_artifact import compressed_manifest

    if source.kind not in STREAMABLE:
        raise EdgePruneError(f"--streaming reads a compressed artifact or a local Hugging Face directory with "
                             f"safetensors, not a {source.kind} source ({source.path}); drop --streaming")
    if source.kind == "artifact":
        compressed_manifest(Path(source.path))
    blockwise = BlockwiseLogits(source.directory)
    tokenizer = transformers.AutoTokenizer.from_pretrained(source.directory)
    prepare_tokenizer(tokenizer)
    return GGUFInput(blockwise.config, blockwise.adapter, tokenizer, source, blockwise, blockwise.tensors,
                     streaming=True)


STREAMABLE = ("artifact", "local")


def wants_streaming(source, say) -> bool:
    """Stream when loading the model would not fit (the rule ``compress`` uses to go --sequential)."""
    from edgeprune.compress.sequential import MEMORY_FRACTION, exceeds_memory

    too_big = exceeds_memory(source) if source.kind in STREAMABLE else None
    if too_big is None:
        return False
    need, available = too_big
    say(f"loading the model needs ~{need / 1e9:.1f} GB, more than {MEMORY_FRACTION:.0%} of the {available / 1e9:.1f} "
        "GB available: writing the GGUF file tensor by tensor from the shards (--streaming)")
    return True


# auto: GPTQ for the 4/5-bit block types, round-to-nearest for q8_0 and the float types (see GPTQ_AUTO_NOTE).
GPTQ_BY_DEFAULT = ("q4_0", "q4_1", "q5_0", "q5_1")
GPTQ_CALIBRATION_TEXT = "stsb:train"  # as the ONNX int4 export: never the WikiText-2 that docs and gate score


def weight_algorithm(config, qtype: str, streaming: bool, say) -> tuple[str, str | None]:
    """(``rtn`` or ``gptq``, GPTQ's calibration text) for a GGUF export, ``auto`` resolved; checked before the
    model is loaded. ``auto`` falls back to rtn, saying why in one line, when GPTQ cannot run (a streamed
    export, no calibration text); an explicit ``gptq`` fails instead."""
    from edgeprune.core.data_sources import resolve_data
    from edgeprune.exporters.gguf_gptq import GPTQ_TYPES

    algorithm, explicit = config.weight_algorithm, config.weight_algorithm != "auto"
    if algorithm == "hqq":
        raise EdgePruneError("--weight-algorithm hqq is for ONNX int4-weight; GGUF files take rtn or gptq")
    if not explicit:
        algorithm = "gptq" if qtype in GPTQ_BY_DEFAULT else "rtn"
    if algorithm == "rtn":
        return "rtn", None
    if qtype not in GPTQ_TYPES:
        raise EdgePruneError(f"--weight-algorithm gptq rounds onto the GGUF block types {', '.join(GPTQ_TYPES)}; "
                             f"{qtype} has no grid to round onto")
    if streaming:
        if explicit:
            raise EdgePruneError("--weight-algorithm gptq runs the model in memory for its calibration pass; "
                                 "drop --streaming or use --weight-algorithm rtn")
        say(f"{qtype} rounds to nearest (rtn), not GPTQ: GPTQ's calibration pass needs the model in memory")
        return "rtn", None
    try:
        return "gptq", str(config.calib or resolve_data(GPTQ_CALIBRATION_TEXT))
    except EdgePruneError as exc:
        if explicit:
            raise EdgePruneError(f"--weight-algorithm gptq needs calibration text: pass --calib PATH ({exc})") from None
        say(f"{qtype} rounds to nearest (rtn), not GPTQ: no calibration text ({exc}); pass --calib PATH for GPTQ")
        return "rtn", None


def lm_head_type(config, qtype: str) -> str | None:
    """The LM head's GGUF type ``--lm-head-bits`` asks for (None: ``core.ggufio._tensor_type``'s rule, q8_0
    under the 4/5-bit types): 8 -> q8_0, 0 -> f16, 4 -> the blocks' own 4-bit type."""
    bits = config.lm_head_bits
    if bits is None:
        return None
    if bits == 4 and qtype not in ("q4_0", "q4_1"):
        raise EdgePruneError(f"--lm-head-bits 4 writes the LM head in the blocks' 4-bit type; --quantize {qtype} "
                             "has none (use q4_0 or q4_1)")
    return {0: "f16", 8: "q8_0", 4: qtype}[bits]


def _gptq_quantizer(model: GGUFInput, config, source: str, progress: bool, head_type: str | None):
    from edgeprune.core.datasets import token_windows
    from edgeprune.exporters.gguf_gptq import GGUFGPTQ, linear_hessians

    windows = token_windows(model.tokenizer, source, config.gptq_window_tokens, config.gptq_windows)
    # the LM head (the tied table) by GPTQ only when it is as coarse as the blocks: at q8_0 it rounds to nearest
    head = head_type in ("q4_0", "q4_1", "q5_0", "q5_1")
    hessians, tokens = linear_hessians(model.module, windows, progress, lm_head=head)
    return GGUFGPTQ(hessians, tokens, f"{source} ({len(windows)} windows of {windows.shape[1]} tokens)")


def _check_gguf_request(config) -> None:
    """Everything that can be refused before the (slow) load."""
    from edgeprune.runtime.base import get_runtime

    check_gguf_type("f16" if config.quantize == "none" else config.quantize)
    runtime = get_runtime("llamacpp", require_available=False)
    if not runtime.available():  # every GGUF export is validated in llama.cpp
        raise EdgePruneError(f"--target llamacpp validates the GGUF file in llama.cpp: {runtime.why_unavailable()}")
    if config.calib and not Path(config.calib).is_file():
        raise EdgePruneError(f"calibration data not found: {config.calib}")
    if config.task not in ("auto", "text-generation"):
        raise EdgePruneError(f"--target llamacpp exports text-generation models (got --task {config.task})")


def export_gguf(source, out: Path, config, overwrite: bool = False, allow_pickle: bool = False,
                progress: bool = True, streaming: bool | None = None) -> Path:
    """``streaming``: True reads the checkpoint one tensor at a time (never the whole model in memory), False
    loads it, None chooses by the available memory."""
    from edgeprune.core.loading import load_model, resolve

    def say(message: str) -> None:
        if progress:
            print(f"[export] {message}", file=sys.stderr, flush=True)

    qtype = "f16" if config.quantize == "none" else config.quantize
    _check_gguf_request(config)
    timings: dict[str, float] = {}
    started = time.perf_counter()
    resolved = resolve(source)
    if streaming is None:
        streaming = wants_streaming(resolved, say)
    say(f"{'opening' if streaming else 'loading'} {source}")
    algorithm, calibration = weight_algorithm(config, qtype, streaming, say)
    head_type = lm_head_type(config, qtype)
    model = (streaming_input(resolved) if streaming
             else in_memory_input(load_model(source, task="text-generation", allow_pickle=allow_pickle)))
    timings["load_s"] = round(time.perf_counter() - started, 3)
    with staged_output(out, overwrite) as tmp:
        quantizer = None
        if algorithm == "gptq":
            step = time.perf_counter()
            say(f"GPTQ: Hessians of every Linear's input from {calibration}")
            quantizer = _gptq_quantizer(model, config, calibration, progress, head_type)
            timings["gptq_calibration_s"] = round(time.perf_counter() - step, 3)
        step = time.perf_counter()
        say(f"writing {GGUF_FILE} ({qtype}{' by GPTQ' if quantizer else ''}"
            f"{', streamed from the shards' if streaming else ''})")
        read, tensor_shapes = model.tensors()
        info = export_tensors(model.config, model.adapter, model.tokenizer, model.source, read, tensor_shapes,
                              tmp / GGUF_FILE, qtype, progress, quantizer, head_type)
        info["streaming"] = streaming
        info["weight_algorithm"] = quantizer.record() if quantizer else {"algorithm": "rtn"}
        del quantizer  # its Hessians: the gate below needs the memory more
        timings["write_s"] = round(time.perf_counter() - step, 3)
        model.config.save_pretrained(tmp)  # vocab size, layer shapes etc. for tools that read config.json
        step = time.perf_counter()
        say("validating the GGUF file in llama.cpp against PyTorch")
        validation = {qtype: validate_gguf(tmp / GGUF_FILE, model, qtype, config)}
        timings["validate_s"] = round(time.perf_counter() - step, 3)
        _raise_if_failed(validation[qtype], qtype)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        _write_gguf_manifest(tmp, source, model, config.replace(quantize=qtype, weight_algorithm=algorithm), info,
                             validation, timings)
        say(f"wrote {out}")
    return out


def _raise_if_failed(report: dict[str, Any], qtype: str) -> None:
    if not report["passed"]:
        gate = report["decoder_gate"]
        raise EdgePruneError(f"the {qtype} GGUF file fails the quality gate: perplexity ratio "
                             f"{gate['perplexity']['ratio']} (max {gate['perplexity']['max_ratio']}), greedy "
                             f"agreement {gate['greedy']['agreement']:.3f} (min {gate['greedy']['min_agreement']})")


def _write_gguf_manifest(tmp: Path, source, model: GGUFInput, config, info, validation, timings) -> None:
    shapes = info["layer_shapes"]
    head_dim = model.adapter.head_dim(model.config)
    parent = source if model.source.kind == "artifact" else {"model": model.source.to_dict()}
    variant = {"file": GGUF_FILE, "format": "gguf", "bytes": info["bytes"], "quantization": config.quantize,
               "architecture": info["architecture"], "tensor_types": info["tensor_types"],
               "weight_algorithm": info["weight_algorithm"]}
    write_manifest(tmp, "export", config.to_dict(), parent,
                   task="text-generation", with_past=True,
                   files_by_role={"llamacpp": GGUF_FILE, "onnxruntime": None, "deepsparse": None},
                   variants=[variant], validation=validation,
                   kv_layout=[{"kv_heads": s["kv_heads"], "head_dim": head_dim} for s in shapes],
                   steps={"gguf": info}, model_type=model.config.model_type,
                   source_kind=model.source.kind, timings=timings)
