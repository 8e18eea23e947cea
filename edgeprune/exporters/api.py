"""``export``: model, compressed artifact or existing export -> validated ONNX export directory.

Pipeline (each step validated before the next): ONNX export -> [fusion] -> [INT8] -> [sparse initializers]
-> [dense DeepSparse copy]. Intermediates live in a scratch directory; only the final files land in the
staged output, which replaces ``out`` when everything passed.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.artifacts import (DEFAULT_ONNX, MANIFEST, check_output_dir, is_artifact, read_manifest,
                                 staged_output, write_manifest)
from edgeprune.configs import FrozenConfig
from edgeprune.errors import EdgePruneError
from edgeprune.exporters.quantize import MODES as QUANT_MODES
from edgeprune.exporters.quantize import WEIGHT_ONLY_BITS
from edgeprune.exporters.sparse import MODES as SPARSE_MODES

TASKS = ("auto", "feature-extraction", "sequence-classification", "text-generation")
TARGETS = ("onnxruntime", "deepsparse", "llamacpp")
DENSE_FILE = "model_dense.onnx"
# DeepSparse 1.8 reads ONNX IR <= 9 (onnx < 1.15) and opsets up to 17 (checked by compiling with it).
DEEPSPARSE_MAX_IR = 9
DEEPSPARSE_MAX_OPSET = 17
SOURCE_ONNX_OPSETS = (11, 21)  # opsets this exporter re-processes when the source is already ONNX


@dataclass(frozen=True)
class ExportConfig(FrozenConfig):
    """How to export. Saved as the manifest's ``config``."""

    task: str = "auto"
    opset: int = 17
    with_past: bool = True  # decoders: KV-cache inputs/outputs
    simplify: bool = True  # fold shape arithmetic (static reshapes; exporters/simplify.py)
    optimize: bool = False
    quantize: str = "none"  # none | int8-dynamic | int8-static | int4-weight | int8-weight; --target llamacpp: a GGUF type (default f16)
    calib: str | None = None  # STS tsv or text file (int8-static calibration; texts for the INT8 task check)
    calib_samples: int = 128
    calib_max_length: int = 128
    per_channel: bool = True
    sparse_initializers: str = "auto"  # auto | on | off
    target: str = "onnxruntime"  # onnxruntime | deepsparse | llamacpp (GGUF)
    atol: float = 1e-3  # numeric gate: fail when both abs and relative error exceed their tolerance
    rtol: float = 1e-3
    min_cosine: float = 0.99  # INT8 gate, embeddings
    min_top1: float = 0.9  # INT8 gate, classifiers
    # Weight-only (MatMulNBits) settings. Symmetric and accuracy level 4 measured on SmolLM2-135M (docs/export.md);
    # block 32 is the GGUF source's own block size (not measured against others).
    weight_block_size: int = 32
    weight_symmetric: bool = True
    accuracy_level: int = 4  # MatMulNBits compute precision floor: 4 = int8 activations inside the kernel
    quantize_embeddings: bool = True  # int4-weight: embedding table as GatherBlockQuantized (needs opset 21)
    # Decoder quality gate for quantized decoders (exporters/decoder_gate.py), against the fp32 export.
    gate_tokens: int = 4096
    max_ppl_ratio: float = 1.05
    min_greedy_agreement: float = 0.75
    seed: int = 0

    def __post_init__(self):
        if self.target == "llamacpp" and self.quantize != "none":  # "none" means f16 there
            from edgeprune.exporters.gguf_export import check_gguf_type

            check_gguf_type(self.quantize)
        checks = [(self.task in TASKS, f"--task must be one of {', '.join(TASKS)} (got {self.task!r})"),
                  (self.target == "llamacpp" or self.quantize in QUANT_MODES, f"--quantize must be one of {', '.join(QUANT_MODES)} (got {self.quantize!r})"),
                  (self.sparse_initializers in SPARSE_MODES,
                   f"--sparse-initializers must be one of {', '.join(SPARSE_MODES)} (got {self.sparse_initializers!r})"),
                  (self.target in TARGETS, f"--target must be one of {', '.join(TARGETS)} (got {self.target!r})"),
                  (9 <= self.opset <= 21, f"--opset must be between 9 and 21 (got {self.opset})"),
                  (self.calib_samples >= 1 and self.calib_max_length >= 2, "calibration sizes must be positive"),
                  (self.atol > 0 and self.rtol > 0, "tolerances must be positive"),
                  (self.weight_block_size >= 16 and self.weight_block_size & (self.weight_block_size - 1) == 0,
                   f"--block-size must be a power of two >= 16 (got {self.weight_block_size})"),
                  (self.accuracy_level in (0, 1, 2, 3, 4), f"--accuracy-level must be 0..4 (got {self.accuracy_level})"),
                  (self.gate_tokens >= 64, f"--gate-tokens must be >= 64 (got {self.gate_tokens})"),
                  (self.max_ppl_ratio >= 1.0 and 0.0 <= self.min_greedy_agreement <= 1.0,
                   "decoder gate: max_ppl_ratio must be >= 1 and min_greedy_agreement in [0, 1]")]
        for ok, message in checks:
            if not ok:
                raise EdgePruneError(message)
        if self.target == "deepsparse":
            if self.opset > DEEPSPARSE_MAX_OPSET:
                raise EdgePruneError(f"--target deepsparse: DeepSparse 1.8 supports ONNX opset <= {DEEPSPARSE_MAX_OPSET} "
                                     f"(got --opset {self.opset})")
            if self.optimize:
                raise EdgePruneError("--target deepsparse cannot use --optimize: ORT fusion emits com.microsoft "
                                     "operators DeepSparse does not run")
            if self.quantize == "int8-dynamic":
                raise EdgePruneError("--target deepsparse cannot use --quantize int8-dynamic: DeepSparse 1.8 cannot run "
                                     "dynamic INT8 operators (MatMulInteger); use --quantize int8-static --calib PATH")
        if self.quantize in WEIGHT_ONLY_BITS:
            if self.target == "deepsparse":
                raise EdgePruneError(f"--quantize {self.quantize} cannot be combined with --target deepsparse: "
                                     "DeepSparse does not run onnxruntime's MatMulNBits operator; use "
                                     "--quantize int8-static or none for DeepSparse")
            if self.sparse_initializers == "on":
                raise EdgePruneError(f"--quantize {self.quantize} cannot be combined with --sparse-initializers on: "
                                     "MatMulNBits stores packed integer blocks, not zeros; use --sparse-initializers "
                                     "off or auto")
        if self.quantize == "int8-static" and not self.calib:
            raise EdgePruneError("--quantize int8-static needs calibration data: pass --calib PATH (STS tsv or text)")


# --- sources -----------------------------------------------------------------------------------------------
def _onnx_source(source: str | Path) -> Path | None:
    """The ONNX file when ``source`` is an existing export directory or a .onnx file, else None."""
    path = Path(source)
    if path.is_file() and path.suffix == ".onnx":
        return path
    if path.is_dir() and is_artifact(path) and read_manifest(path).get("stage") == "export":
        from edgeprune.artifacts import onnx_model_path

        return onnx_model_path(path, "onnxruntime")
    return None


class _Context:
    """What the pipeline steps need, whichever kind of source it came from."""

    def __init__(self, task, decoder, layout, vocab_size, type_vocab, reference, reference_name, tokenizer,
                 model=None, max_positions=None):
        self.task, self.decoder, self.layout = task, decoder, layout
        self.vocab_size, self.type_vocab = vocab_size, type_vocab
        self.reference, self.reference_name = reference, reference_name
        self.tokenizer, self.model = tokenizer, model
        self.max_positions = max_positions  # decoders: longest sequence the position embedding/rope allows


def _max_positions(config: dict) -> int | None:
    return next((int(config[k]) for k in ("max_position_embeddings", "n_positions") if config.get(k)), None)


def _calibration_batches(ctx: _Context, path: str, input_names, config: ExportConfig, offset: int = 0,
                         count: int | None = None):
    from edgeprune.eval.data import read_sentences
    from edgeprune.exporters.validate import text_feeds

    count = count or config.calib_samples
    sentences = read_sentences(path, limit=offset + count)[offset:offset + count]
    if not sentences:
        raise EdgePruneError(f"{path}: fewer than {offset + 1} sentences for calibration/checking")
    batch = 16
    return [text_feeds(ctx.tokenizer, sentences[i:i + batch], input_names, ctx.layout, config.calib_max_length)
            for i in range(0, len(sentences), batch)]


# Text for the INT8 task gate when no --calib is given: the STS-B *train* split (a built-in data key)
# (never the dev split the docs report). Random token ids are the last resort: out-of-distribution inputs
# understate INT8 quality (dense MiniLM, per-channel: mean cosine 0.9935 on text, 0.9885 on random ids).
DEFAULT_CHECK_DATA = "stsb:train"


def _check_batches(ctx: _Context, input_names, config: ExportConfig) -> tuple[list, str]:
    """Inputs for the INT8 task gate and where they came from: held-out calibration text, the default
    text file, or random token ids."""
    import numpy as np

    from edgeprune.data_sources import resolve_data
    from edgeprune.exporters.validate import random_feeds

    if ctx.tokenizer is not None:
        if config.calib:
            return (_calibration_batches(ctx, config.calib, input_names, config, offset=config.calib_samples, count=64),
                    f"{config.calib} (sentences after the calibration ones)")
        try:
            default = resolve_data(DEFAULT_CHECK_DATA)
        except EdgePruneError:
            default = None  # not reachable: random ids below (the manifest names the source)
        if default is not None:
            return _calibration_batches(ctx, str(default), input_names, config, count=64), str(default)
    rng = np.random.default_rng(config.seed + 7)
    batches = []
    for batch, seq in ((8, 16), (8, 32), (4, 64)):
        feeds = random_feeds(input_names, batch, seq, 0, ctx.vocab_size, ctx.layout, rng, ctx.type_vocab)
        if "token_type_ids" in feeds:
            feeds["token_type_ids"][:] = 0
        batches.append(feeds)
    return batches, "random token ids"


# Text for the decoder quality gate when no --calib is given: the *end* of WikiText-2 valid, so the gate never
# sees the head of the file that the docs' perplexities score (they use its first 8-20 k tokens).
DEFAULT_DECODER_GATE_DATA = "wikitext-2/valid.txt"
_GATE_TAIL_CHARS_PER_TOKEN = 16  # generous: English BPE averages ~4 characters per token


def _decoder_gate_tokens(ctx: _Context, config: ExportConfig) -> tuple[Any, str]:
    """``config.gate_tokens`` token ids for the decoder gate and where they came from: the start of the
    --calib text, the end of the default text file, or (no tokenizer / no text) random token ids."""
    import numpy as np

    from edgeprune.eval.data import read_corpus
    from edgeprune.paths import data_dir

    if ctx.tokenizer is not None:
        if config.calib:
            text = read_corpus(config.calib)[: config.gate_tokens * _GATE_TAIL_CHARS_PER_TOKEN]
            ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"][: config.gate_tokens]
            source = f"{config.calib} (first {len(ids)} tokens)"
        else:
            default = data_dir() / DEFAULT_DECODER_GATE_DATA
            ids = []
            if default.is_file():
                text = read_corpus(default)[-config.gate_tokens * _GATE_TAIL_CHARS_PER_TOKEN:]
                ids = ctx.tokenizer(text, add_special_tokens=False)["input_ids"][-config.gate_tokens:]
                source = f"{default} (last {len(ids)} tokens)"
        if len(ids) >= 64:
            return np.asarray(ids, dtype=np.int64), source
        if config.calib:
            raise EdgePruneError(f"{config.calib}: {len(ids)} tokens, the decoder gate needs at least 64")
    rng = np.random.default_rng(config.seed + 11)
    return rng.integers(0, ctx.vocab_size, config.gate_tokens, dtype=np.int64), "random token ids"


def _decoder_gate(candidate: Path, reference: Path, ctx: _Context, config: ExportConfig, with_past: bool) -> dict:
    """Perplexity ratio and greedy agreement of a quantized decoder against its fp32 export; raises on failure."""
    from edgeprune.exporters.decoder_gate import decoder_quality_gate
    from edgeprune.exporters.validate import ort_logits_fn

    ids, source = _decoder_gate_tokens(ctx, config)
    layout = ctx.layout if with_past else None
    report = decoder_quality_gate(ort_logits_fn(reference, layout), ort_logits_fn(candidate, layout), ids,
                                  window=min(512, len(ids), ctx.max_positions or 512), greedy_prompt_len=32,
                                  greedy_tokens=32,
                                  max_ppl_ratio=config.max_ppl_ratio, min_greedy_agreement=config.min_greedy_agreement)
    report["data"] = source
    if not report["passed"]:
        ppl, greedy = report["perplexity"], report["greedy"]
        ratio = "non-finite" if ppl["ratio"] is None else f"{ppl['ratio']:.4f}"
        raise EdgePruneError(
            f"{config.quantize} decoder fails the quality gate against the fp32 export on {source}: perplexity "
            f"ratio {ratio} (max {config.max_ppl_ratio}), greedy agreement {greedy['agreement']:.3f} "
            f"(min {config.min_greedy_agreement}); try --quantize int8-weight or int4-weight with a smaller --block-size")
    return report


# --- DeepSparse ------------------------------------------------------------------------------------------------
def deepsparse_python() -> str | None:
    """The DeepSparse interpreter the runtime would use ($EDGEPRUNE_DEEPSPARSE_PYTHON or the installed venv)."""
    from edgeprune.runtime.deepsparse_adapter import worker_python

    python = worker_python()
    return str(python) if python.is_file() else None


_DS_SCRIPT = r"""
import json, sys
import numpy as np
from deepsparse import compile_model
path, feeds_path, out_path = sys.argv[1:4]
feeds = np.load(feeds_path)
names = json.loads(sys.argv[4])
inputs = [feeds[n] for n in names]
engine = compile_model(path, batch_size=inputs[0].shape[0], input_shapes=[list(x.shape) for x in inputs])
outputs = engine.run(inputs)
np.savez(out_path, *outputs)
"""


def deepsparse_check(path: Path, ctx: _Context, timeout: int = 900) -> dict[str, Any]:
    """Compile ``path`` with DeepSparse in its own interpreter and compare one inference with onnxruntime."""
    import numpy as np

    from edgeprune.exporters.validate import ort_session, random_feeds, run_session

    python = deepsparse_python()
    if python is None:
        return {"checked": False, "reason": "no DeepSparse environment (set EDGEPRUNE_DEEPSPARSE_PYTHON)"}
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    # Decoders: one prefill step with a short past; DeepSparse compiles static shapes.
    feeds = random_feeds(names, 1, 16, 4 if ctx.decoder else 0, ctx.vocab_size, ctx.layout,
                         np.random.default_rng(5), ctx.type_vocab)
    expected = run_session(session, feeds)
    with tempfile.TemporaryDirectory(prefix="edgeprune-ds-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        # A copy: DeepSparse rewrites the input shapes of the file it compiles, in place.
        shutil.copy2(path, Path(tmp) / "model.onnx")
        cmd = [python, "-c", _DS_SCRIPT, str(Path(tmp) / "model.onnx"), str(Path(tmp) / "feeds.npz"), str(Path(tmp) / "out.npz"),
               json.dumps(names)]
        started = time.perf_counter()
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgePruneError(f"DeepSparse did not compile {path.name} within {timeout}s") from None
        if result.returncode != 0:
            from edgeprune.runtime.deepsparse_adapter import crash_reason

            raise EdgePruneError(f"DeepSparse 1.8 rejects {path.name}: {crash_reason(result.stderr or 'no error output')[:300]}")
        with np.load(Path(tmp) / "out.npz") as out:
            got = [out[f"arr_{i}"] for i in range(len(out.files))]
    max_abs = max(float(np.abs(a - b).max()) for a, b in zip(expected.values(), got) if a.size)
    return {"checked": True, "python": python, "compile_and_run_s": round(time.perf_counter() - started, 2),
            "max_abs_vs_onnxruntime": max_abs}


def _to_deepsparse_int8(path: Path) -> dict[str, Any]:
    """Rewrite the static QDQ file at ``path`` into MatMulInteger form in place (exporters/deepsparse_int8.py)."""
    import onnx

    from edgeprune.exporters.deepsparse_int8 import qdq_to_matmulinteger

    model = onnx.load(str(path))
    info = qdq_to_matmulinteger(model)
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return info


def deepsparse_ready(model) -> list[str]:
    """Why an ONNX model would be refused by DeepSparse 1.8 (empty list: acceptable)."""
    from edgeprune.exporters.sparse import opset_of

    problems = []
    if model.graph.sparse_initializer:
        problems.append("it holds sparse initializers")
    if model.ir_version > DEEPSPARSE_MAX_IR:
        problems.append(f"IR version {model.ir_version} > {DEEPSPARSE_MAX_IR}")
    if opset_of(model) > DEEPSPARSE_MAX_OPSET:
        problems.append(f"opset {opset_of(model)} > {DEEPSPARSE_MAX_OPSET}")
    domains = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if domains:
        problems.append(f"it uses non-standard operator domains {domains}")
    dynamic = sorted({n.op_type for n in model.graph.node if n.op_type in DEEPSPARSE_UNSUPPORTED_OPS})
    if dynamic:
        problems.append(f"it uses dynamic INT8 operators {dynamic}, which DeepSparse 1.8 crashes on "
                        "(use --quantize int8-static)")
    odd = _odd_matmul_widths(model)
    if odd:
        problems.append(f"matrix widths {odd} are not multiples of {DEEPSPARSE_WIDTH_MULTIPLE} (DeepSparse 1.8's "
                        "compiler aborts on them at sequence lengths above 64; compress with "
                        f"--round-to {DEEPSPARSE_WIDTH_MULTIPLE})")
    return problems


# Dynamic-quantization operators: DeepSparse 1.8 aborts on an int8-dynamic export ("please email ...").
# MatMulInteger fed by a static QuantizeLinear (the --target deepsparse int8-static form) compiles.
DEEPSPARSE_UNSUPPORTED_OPS = ("DynamicQuantizeLinear",)
# Measured on MiniLM pruned by the global FLOPs search: FFN widths like 811 or 383 abort DeepSparse 1.8 at
# seq 128 (assertion in fused_ops.cpp) while the same plan rounded down to multiples of 4 compiles and runs.
DEEPSPARSE_WIDTH_MULTIPLE = 4


def _odd_matmul_widths(model) -> list[int]:
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    odd = set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger"):
            for name in node.input[:2]:
                dims = shapes.get(name, ())
                if len(dims) == 2:
                    odd.update(d for d in dims if d % DEEPSPARSE_WIDTH_MULTIPLE)
    return sorted(odd)


# --- pipeline -----------------------------------------------------------------------------------------------
def _prepare_from_model(source, config: ExportConfig, tmp: Path, work: Path, allow_pickle: bool):
    from edgeprune.exporters.onnx_export import ONNX_FILE, export_with_optimum
    from edgeprune.exporters.validate import torch_reference
    from edgeprune.models import load_model

    started = time.perf_counter()
    loaded = load_model(source, task=None if config.task == "auto" else config.task, allow_pickle=allow_pickle)
    load_s = time.perf_counter() - started
    decoder = loaded.task == "text-generation"
    with_past = decoder and config.with_past
    info = export_with_optimum(loaded, tmp, loaded.task, with_past, config.opset)
    shutil.move(str(tmp / ONNX_FILE), work / "fp32.onnx")
    model_config = loaded.model.config
    ctx = _Context(loaded.task, decoder, info.get("kv_layout"), model_config.vocab_size,
                   getattr(model_config, "type_vocab_size", 2), torch_reference(loaded.model), "PyTorch",
                   loaded.tokenizer, loaded.model, _max_positions(model_config.to_dict()))
    parent = source if loaded.source.kind == "artifact" else {"model": loaded.source.to_dict()}
    optimum_info = {k: v for k, v in info.items() if k != "kv_layout"}  # the layout is a top-level key
    meta = {"model_type": model_config.model_type, "source_kind": loaded.source.kind, "optimum": optimum_info,
            "with_past": with_past, "load_s": round(load_s, 3), "model_stats": _model_stats(loaded)}
    return ctx, parent, meta


def _model_stats(loaded) -> dict[str, Any]:
    """Parameters and block-FLOPs coefficients, recorded in the export so reports read them from the export
    itself (not from a parent artifact that may be absent, nor from transformers, which a device lacks)."""
    from edgeprune.compress.surgery import analytic_flops, parameter_count

    parameters = parameter_count(loaded.model)
    dense = parameters
    if loaded.source.kind == "artifact":
        dense = read_manifest(loaded.source.path).get("dense_parameters") or parameters
    adapter, config = loaded.adapter, loaded.model.config
    shapes = adapter.shapes(config)
    one, two = (analytic_flops(adapter, config, shapes, s) for s in (1, 2))
    quadratic = (two - 2 * one) / 2  # block FLOPs are linear + quadratic (attention) in the sequence length
    return {"parameters": parameters, "dense_parameters": dense,
            "flops": {"linear": one - quadratic, "quadratic": quadratic,
                      "scope": "transformer blocks, 2 FLOPs per multiply-add"}}


def _prepare_from_onnx(onnx_path: Path, config: ExportConfig, tmp: Path, work: Path):
    import onnx

    from edgeprune.exporters.sparse import densify
    from edgeprune.exporters.validate import check_onnx_file, onnx_reference

    model = check_onnx_file(onnx_path)
    from edgeprune.exporters.sparse import opset_of

    opset = opset_of(model)
    if not SOURCE_ONNX_OPSETS[0] <= opset <= SOURCE_ONNX_OPSETS[1]:
        raise EdgePruneError(f"{onnx_path}: opset {opset} is outside what this exporter handles "
                             f"({SOURCE_ONNX_OPSETS[0]}..{SOURCE_ONNX_OPSETS[1]})")
    if config.target == "deepsparse" and opset > DEEPSPARSE_MAX_OPSET:
        raise EdgePruneError(f"{onnx_path}: opset {opset} > {DEEPSPARSE_MAX_OPSET}, which DeepSparse 1.8 does not "
                             "support (--target deepsparse); re-export from the model with --opset 17")
    src_dir = onnx_path.parent
    if not (src_dir / "config.json").is_file():
        raise EdgePruneError(f"{src_dir}: no config.json beside {onnx_path.name}; an export directory needs one")
    for item in src_dir.iterdir():  # config, tokenizer, generation config; not the ONNX files or manifest
        if item.is_file() and item.suffix != ".onnx" and item.name != MANIFEST and not item.name.endswith(".onnx_data"):
            shutil.copy2(item, tmp / item.name)
    manifest = read_manifest(src_dir) if is_artifact(src_dir) else {}
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node) and (config.quantize != "none" or config.optimize):
        raise EdgePruneError(f"{onnx_path}: already optimised or quantised (non-standard operators); "
                             "re-export from the model or compressed artifact instead")
    densify(model)
    onnx.save(model, str(work / "fp32.onnx"))
    names = {i.name for i in model.graph.input}
    outputs = {o.name for o in model.graph.output}
    decoder = "logits" in outputs and any(n.startswith("past_key_values.") for n in names) or \
        manifest.get("task") == "text-generation"
    task = manifest.get("task") or ("text-generation" if decoder else
                                    "sequence-classification" if "logits" in outputs else "feature-extraction")
    layout = manifest.get("kv_layout")
    if decoder and layout is None:
        layout = []
        for i in range(sum(1 for n in names if n.endswith(".key") and n.startswith("past_key_values."))):
            dims = next(v for v in model.graph.input if v.name == f"past_key_values.{i}.key").type.tensor_type.shape.dim
            if not dims[1].dim_value or not dims[3].dim_value:
                raise EdgePruneError(f"{onnx_path}: cannot tell the KV layout of layer {i} (symbolic head dims, no manifest)")
            layout.append({"kv_heads": dims[1].dim_value, "head_dim": dims[3].dim_value})
    cfg = json.loads((src_dir / "config.json").read_text())
    tokenizer = None
    if config.quantize != "none":
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(src_dir)
        except (OSError, ValueError):
            if config.calib:
                raise EdgePruneError(f"{src_dir}: no tokenizer to read the --calib text with") from None
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    ctx = _Context(task, decoder, layout, cfg["vocab_size"], cfg.get("type_vocab_size", 2),
                   onnx_reference(work / "fp32.onnx"), f"source ONNX {onnx_path.name}", tokenizer,
                   max_positions=_max_positions(cfg))
    meta = {"model_type": cfg.get("model_type"), "source_kind": "onnx",
            "with_past": any(n.startswith("past_key_values.") for n in names),
            "model_stats": manifest.get("model_stats")}
    parent = src_dir if manifest else str(onnx_path)
    return ctx, parent, meta


def export(source: str | Path, out: str | Path, config: ExportConfig | None = None, overwrite: bool = False,
           allow_pickle: bool = False, progress: bool = True) -> Path:
    """Export ``source`` (alias, model dir, compressed artifact, export dir or .onnx) to ``out``; returns ``out``."""
    import onnx

    from edgeprune.exporters import optimize as opt
    from edgeprune.exporters import quantize as quant
    from edgeprune.exporters.onnx_export import io_signature
    from edgeprune.exporters.sparse import sparsify, variant_record
    from edgeprune.exporters.validate import (check_onnx_file, compare, generation_gate, numeric_gate, ort_session,
                                              random_feeds, run_session, task_gate)

    config = config or ExportConfig()
    out = Path(out)
    if Path(source).exists() and Path(source).resolve() == out.resolve():
        raise EdgePruneError("the output directory must differ from the source")
    check_output_dir(out, overwrite)
    if config.calib:
        from edgeprune.data_sources import resolve_data
        from edgeprune.eval.data import read_sentences

        config = config.replace(calib=str(resolve_data(config.calib)))  # a file or a key such as stsb:train
        calib_sentences = len(read_sentences(config.calib, limit=config.calib_samples))  # before the slow export
        if config.quantize == "int8-static":
            from edgeprune.compress.calibration import warn_if_few

            warn_if_few(calib_sentences, config.calib_samples, config.calib)
    if config.target == "llamacpp":
        from edgeprune.exporters.gguf_api import export_gguf

        return export_gguf(source, out, config, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress)

    def say(message: str) -> None:
        if progress:
            print(f"[export] {message}", file=sys.stderr, flush=True)

    timings: dict[str, float] = {}
    validation: dict[str, Any] = {}
    started = time.perf_counter()
    with staged_output(out, overwrite) as tmp, tempfile.TemporaryDirectory(prefix="edgeprune-export-") as scratch:
        work = Path(scratch)
        onnx_source = _onnx_source(source)
        step = time.perf_counter()
        if onnx_source is not None:
            say(f"reading {onnx_source}")
            ctx, parent, meta = _prepare_from_onnx(onnx_source, config, tmp, work)
        else:
            say(f"loading {source} and exporting to ONNX (opset {config.opset})")
            ctx, parent, meta = _prepare_from_model(source, config, tmp, work, allow_pickle)
        timings["export_s"] = round(time.perf_counter() - step, 3)
        current = work / "fp32.onnx"
        check_onnx_file(current)

        def gate(path: Path, label: str) -> None:
            step = time.perf_counter()
            say(f"validating {label} against {ctx.reference_name}")
            validation[label] = numeric_gate(path, ctx.reference, ctx.vocab_size, ctx.layout, ctx.decoder,
                                             config.atol, config.rtol, seed=config.seed + 1234,
                                             type_vocab=ctx.type_vocab, what=ctx.reference_name)
            if ctx.decoder and ctx.model is not None:
                validation[label]["generation"] = generation_gate(path, ctx.model, ctx.layout, ctx.vocab_size)
            timings[f"validate_{label}_s"] = round(time.perf_counter() - step, 3)

        gate(current, "fp32")
        steps: dict[str, Any] = {}
        if config.simplify:
            from edgeprune.exporters.simplify import simplify

            step = time.perf_counter()
            say("folding shape arithmetic")
            steps["simplify"] = simplify(current, work / "simplified.onnx")
            timings["simplify_s"] = round(time.perf_counter() - step, 3)
            if steps["simplify"]["nodes_after"] < steps["simplify"]["nodes_before"]:
                current = work / "simplified.onnx"
                gate(current, "simplified")
        if config.optimize:
            step = time.perf_counter()
            say("fusing the graph (onnxruntime transformer optimizer)")
            steps["optimize"] = opt.optimize(current, work / "optimized.onnx", ctx.decoder)
            current = work / "optimized.onnx"
            timings["optimize_s"] = round(time.perf_counter() - step, 3)
            gate(current, "optimized")
        quantization = "none"
        if config.quantize != "none":
            step = time.perf_counter()
            say(f"quantizing ({config.quantize})")
            names = [i.name for i in ort_session(current).get_inputs()]
            quantized = work / f"{config.quantize}.onnx"  # its name appears in gate errors
            label = "weight_only" if config.quantize in WEIGHT_ONLY_BITS else "int8"
            if config.quantize == "int8-dynamic":
                steps["quantize"] = quant.quantize_dynamic(current, quantized, config.per_channel)
            elif config.quantize in WEIGHT_ONLY_BITS:
                steps["quantize"] = quant.quantize_weight_only(
                    current, quantized, WEIGHT_ONLY_BITS[config.quantize], config.weight_block_size,
                    config.weight_symmetric, config.accuracy_level, config.quantize_embeddings)
            else:
                if ctx.tokenizer is None:
                    raise EdgePruneError("int8-static needs the tokenizer beside the model for --calib text")
                batches = _calibration_batches(ctx, config.calib, names, config)
                steps["quantize"] = quant.quantize_static(current, quantized, batches, config.per_channel)
                if config.target == "deepsparse":  # DeepSparse 1.8 aborts on the QDQ form; give it SparseML's form
                    steps["quantize"]["deepsparse_form"] = _to_deepsparse_int8(quantized)
                steps["quantize"]["calibration"] = {"source": config.calib, "samples_requested": config.calib_samples,
                                                    "samples_used": calib_sentences}
            timings["quantize_s"] = round(time.perf_counter() - step, 3)
            step = time.perf_counter()
            say(f"checking the {config.quantize} model against the fp32 export")
            if ctx.task == "text-generation":
                validation[label] = _decoder_gate(quantized, current, ctx, config, meta["with_past"])
            else:
                check, check_source = _check_batches(ctx, names, config)
                validation[label] = task_gate(quantized, current, ctx.task, check, config.min_cosine, config.min_top1)
                validation[label]["data"] = check_source
            timings[f"validate_{label}_s"] = round(time.perf_counter() - step, 3)
            quantization = config.quantize
            current = quantized

        # Final onnxruntime file: sparse initializers where they pay (after quantization, never before).
        final = onnx.load(str(current))
        sparsify(final, config.sparse_initializers)
        steps["sparse_initializers"] = {"mode": config.sparse_initializers,
                                        "tensors": len(final.graph.sparse_initializer)}
        onnx.save(final, str(tmp / DEFAULT_ONNX))
        if final.graph.sparse_initializer:
            say(f"checking the sparse-initializer file ({len(final.graph.sparse_initializer)} sparse tensors)")
            session, reference = ort_session(tmp / DEFAULT_ONNX), ort_session(current)
            import numpy as np

            rng = np.random.default_rng(config.seed + 99)
            names = [i.name for i in session.get_inputs()]
            feeds = random_feeds(names, 2, 9, 3 if ctx.decoder and ctx.layout and meta["with_past"] else 0,
                                 ctx.vocab_size, ctx.layout, rng, ctx.type_vocab)
            errors = compare(run_session(reference, feeds), run_session(session, feeds))
            worst = max(e["max_abs"] for e in errors.values())
            validation["sparse_initializers"] = {"max_abs_vs_dense": worst, "passed": worst <= 1e-5}
            if worst > 1e-5:
                raise EdgePruneError(f"sparse-initializer file differs from its dense source (max abs {worst:.3g})")
        variants = [variant_record(tmp / DEFAULT_ONNX, final, quantization, "onnxruntime")]
        roles: dict[str, str | None] = {"onnxruntime": DEFAULT_ONNX, "deepsparse": None}

        # DeepSparse: dense, IR <= 9, standard opset. model.onnx serves when it already qualifies. KV-cache
        # decoders too: the runtime decodes them with a fixed-capacity cache (runtime/pipelines.py).
        if not deepsparse_ready(final):
            roles["deepsparse"] = DEFAULT_ONNX
        elif config.target == "deepsparse":
            dense_copy = onnx.load(str(current))  # the pre-sparsification file: dense with zeros
            dense_copy.ir_version = min(dense_copy.ir_version, DEEPSPARSE_MAX_IR)
            problems = deepsparse_ready(dense_copy)
            if problems:
                raise EdgePruneError(f"cannot make a DeepSparse file: {'; '.join(problems)}")
            onnx.save(dense_copy, str(tmp / DENSE_FILE))
            check_onnx_file(tmp / DENSE_FILE)
            variants.append(variant_record(tmp / DENSE_FILE, dense_copy, quantization, "deepsparse"))
            roles["deepsparse"] = DENSE_FILE
        if config.target == "deepsparse":
            say("compiling with DeepSparse (if its environment exists)")
            step = time.perf_counter()
            validation["deepsparse"] = deepsparse_check(tmp / roles["deepsparse"], ctx)
            timings["deepsparse_check_s"] = round(time.perf_counter() - step, 3)
            if not validation["deepsparse"]["checked"]:  # said on every run, not only in the manifest
                print(f"edgeprune: warning: {roles['deepsparse']} was not compile-checked with DeepSparse: "
                      f"{validation['deepsparse']['reason']} (edgeprune runtime install deepsparse)",
                      file=sys.stderr, flush=True)
        timings["total_s"] = round(time.perf_counter() - started, 3)
        write_manifest(
            tmp, "export", config.to_dict(), parent,
            task=ctx.task, with_past=bool(meta["with_past"]), files_by_role=roles, variants=variants,
            validation=validation, kv_layout=ctx.layout if ctx.decoder else None, io=io_signature(tmp / DEFAULT_ONNX),
            steps=steps, model_type=meta["model_type"], source_kind=meta["source_kind"],
            optimum=meta.get("optimum"), timings=timings, model_stats=meta.get("model_stats"),
        )
        say(f"wrote {out}")
    return out
