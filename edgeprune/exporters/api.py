"""``export``: model, compressed artifact or existing export -> validated ONNX export directory.

Pipeline (each step validated before the next): ONNX export -> [fusion] -> [INT8] -> [sparse initializers]
-> [dense DeepSparse copy]. Intermediates live in a scratch directory; only the final files land in the
staged output, which replaces ``out`` when everything passed.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeprune.core.artifacts import (DEFAULT_ONNX, MANIFEST, check_output_dir, is_artifact, read_manifest,
                                 staged_output, write_manifest)
from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError
from edgeprune.exporters.quantize import MODES as QUANT_MODES
from edgeprune.exporters.quantize import WEIGHT_ALGORITHMS, WEIGHT_ONLY_BITS
from edgeprune.exporters.sparse import MODES as SPARSE_MODES
from edgeprune.runtime.base import export_targets, get_target

TASKS = ("auto", "feature-extraction", "sequence-classification", "text-generation")
DENSE_FILE = "model_dense.onnx"
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
    weight_symmetric: bool = True  # rtn only
    # auto: gptq with an 8-bit LM head for int4-weight (hqq when no calibration text is reachable), rtn for
    # int8-weight. Measured on SmolLM2-135M (docs/export.md): dense, HQQ +0.85 % perplexity at 1.80x fp32
    # decode, RTN +21 % at 2.28x, GPTQ -0.02 % at 1.95x; 25 % pruned, GPTQ (256 windows of 256 tokens) +1.9 %
    # at 2.13x dense fp32 decode, HQQ +12.9 %.
    weight_algorithm: str = "auto"  # auto | rtn | hqq | gptq
    # GPTQ's calibration: windows of the --calib text run together (decoders; sentences for encoders)
    gptq_windows: int = 256
    gptq_window_tokens: int = 256
    lm_head_bits: int | None = None  # the LM head's bits (0: fp32); None: 8 with hqq/gptq int4, else the blocks' bits
    accuracy_level: int = 4  # MatMulNBits compute precision floor: 4 = int8 activations inside the kernel
    quantize_embeddings: bool = True  # embedding table as GatherBlockQuantized, 8-bit beside an 8-bit LM head
    # Decoder quality gate for quantized decoders (exporters/decoder_gate.py), against the fp32 export.
    gate_tokens: int = 4096
    # None: the format's own bounds (ONNX weight-only / INT8: 1.05 and 0.75; GGUF: per type, gguf_api.GATE)
    max_ppl_ratio: float | None = None
    min_greedy_agreement: float | None = None
    seed: int = 0

    def __post_init__(self):
        target = get_target(self.target)  # the runtime's own export target (an unknown name fails here)
        if target.file_format == "gguf" and self.quantize != "none":  # "none" means f16 there
            from edgeprune.core.ggufio import check_gguf_type

            check_gguf_type(self.quantize)
        checks = [(self.task in TASKS, f"--task must be one of {', '.join(TASKS)} (got {self.task!r})"),
                  (target.file_format == "gguf" or self.quantize in QUANT_MODES, f"--quantize must be one of {', '.join(QUANT_MODES)} (got {self.quantize!r})"),
                  (self.sparse_initializers in SPARSE_MODES,
                   f"--sparse-initializers must be one of {', '.join(SPARSE_MODES)} (got {self.sparse_initializers!r})"),
                  (9 <= self.opset <= 21, f"--opset must be between 9 and 21 (got {self.opset})"),
                  (self.calib_samples >= 1 and self.calib_max_length >= 2 and self.gptq_windows >= 1
                   and self.gptq_window_tokens >= 2, "calibration sizes must be positive"),
                  (self.atol > 0 and self.rtol > 0, "tolerances must be positive"),
                  (self.weight_block_size >= 16 and self.weight_block_size & (self.weight_block_size - 1) == 0,
                   f"--block-size must be a power of two >= 16 (got {self.weight_block_size})"),
                  (self.accuracy_level in (0, 1, 2, 3, 4), f"--accuracy-level must be 0..4 (got {self.accuracy_level})"),
                  (self.lm_head_bits in (None, 0, 4, 8), f"--lm-head-bits must be 0 (fp32), 4 or 8 (got {self.lm_head_bits})"),
                  (self.weight_algorithm in ("auto", *WEIGHT_ALGORITHMS),
                   f"--weight-algorithm must be one of auto, {', '.join(WEIGHT_ALGORITHMS)} (got {self.weight_algorithm!r})"),
                  (self.weight_algorithm != "hqq" or self.quantize != "int8-weight",
                   "--weight-algorithm hqq is for int4-weight: onnxruntime 1.32's CPU MatMulNBits does not load "
                   "8-bit weights with HQQ's float zero points"),
                  (self.gate_tokens >= 64, f"--gate-tokens must be >= 64 (got {self.gate_tokens})"),
                  ((self.max_ppl_ratio is None or self.max_ppl_ratio >= 1.0)
                   and (self.min_greedy_agreement is None or 0.0 <= self.min_greedy_agreement <= 1.0),
                   "decoder gate: max_ppl_ratio must be >= 1 and min_greedy_agreement in [0, 1]")]
        for ok, message in checks:
            if not ok:
                raise EdgePruneError(message)
        problems = target.config_problems(self)
        if problems:
            raise EdgePruneError(problems[0])
        if self.quantize in WEIGHT_ONLY_BITS and self.sparse_initializers == "on":
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
        from edgeprune.core.artifacts import onnx_model_path

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
                         count: int | None = None, max_length: int | None = None):
    from edgeprune.core.datasets import read_sentences
    from edgeprune.core.onnxio import text_feeds

    count = count or config.calib_samples
    sentences = read_sentences(path, limit=offset + count)[offset:offset + count]
    if not sentences:
        raise EdgePruneError(f"{path}: fewer than {offset + 1} sentences for calibration/checking")
    batch = 16
    return [text_feeds(ctx.tokenizer, sentences[i:i + batch], input_names, ctx.layout,
                       max_length or config.calib_max_length)
            for i in range(0, len(sentences), batch)]


# Text for the INT8 task gate when no --calib is given: the STS-B *train* split (a built-in data key)
# (never the dev split the docs report). Random token ids are the last resort: out-of-distribution inputs
# understate INT8 quality (dense MiniLM, per-channel: mean cosine 0.9935 on text, 0.9885 on random ids).
DEFAULT_CHECK_DATA = "stsb:train"


def _check_batches(ctx: _Context, input_names, config: ExportConfig) -> tuple[list, str]:
    """Inputs for the INT8 task gate and where they came from: held-out calibration text, the default
    text file, or random token ids."""
    import numpy as np

    from edgeprune.core.data_sources import resolve_data
    from edgeprune.core.onnxio import random_feeds

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


def _gptq_calibration(ctx: _Context, config: ExportConfig, input_names, with_past: bool | None) -> tuple[list, str]:
    """Feeds for GPTQ's Hessians and where they came from: ``--calib`` or the default calibration text
    (STS-B train, never the WikiText-2 the decoder gate and the docs score). Decoders get
    ``gptq_windows`` windows of ``gptq_window_tokens`` tokens of the text run together (GPTQ wants every
    position of long sequences); encoders get as many of the text's sentences, padded (the padding is masked
    out)."""
    from edgeprune.core.data_sources import resolve_data
    from edgeprune.core.datasets import token_windows
    from edgeprune.core.onnxio import prompt_feeds

    if ctx.tokenizer is None:
        raise EdgePruneError("--weight-algorithm gptq needs the tokenizer beside the model for its calibration text")
    source = config.calib or str(resolve_data(DEFAULT_CHECK_DATA))
    length, count = config.gptq_window_tokens, config.gptq_windows
    if ctx.task != "text-generation":
        return _calibration_batches(ctx, source, input_names, config, count=count, max_length=length), source
    tokens = token_windows(ctx.tokenizer, source, length, count)
    layout = ctx.layout if with_past else None
    batches = [prompt_feeds(tokens[i:i + 8], input_names, layout) for i in range(0, len(tokens), 8)]
    return batches, f"{source} ({len(tokens)} windows of {length} tokens)"


# Text for the decoder quality gate when no --calib is given: the *end* of WikiText-2 valid, so the gate never
# sees the head of the file that the docs' perplexities score (they use its first 8-20 k tokens).
DEFAULT_DECODER_GATE_DATA = "wikitext-2/valid.txt"
_GATE_TAIL_CHARS_PER_TOKEN = 16  # generous: English BPE averages ~4 characters per token


def _decoder_gate_tokens(ctx: _Context, config: ExportConfig) -> tuple[Any, str]:
    """``config.gate_tokens`` token ids for the decoder gate and where they came from: the start of the
    --calib text, the end of the default text file, or (no tokenizer / no text) random token ids."""
    import numpy as np

    from edgeprune.core.datasets import read_corpus
    from edgeprune.core.paths import data_dir

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


ONNX_DECODER_GATE = (1.05, 0.75)  # quantized ONNX decoders vs their fp32 export: (max ppl ratio, min greedy)


def _decoder_gate(candidate: Path, reference: Path, ctx: _Context, config: ExportConfig, with_past: bool) -> dict:
    """Perplexity ratio and greedy agreement of a quantized decoder against its fp32 export; raises on failure."""
    from edgeprune.exporters.decoder_gate import decoder_quality_gate, gate_bounds
    from edgeprune.exporters.validate import ort_logits_fn

    ids, source = _decoder_gate_tokens(ctx, config)
    layout = ctx.layout if with_past else None
    max_ratio, min_greedy = gate_bounds(config, ONNX_DECODER_GATE)
    report = decoder_quality_gate(ort_logits_fn(reference, layout), ort_logits_fn(candidate, layout), ids,
                                  window=min(512, len(ids), ctx.max_positions or 512), greedy_prompt_len=32,
                                  greedy_tokens=32, max_ppl_ratio=max_ratio, min_greedy_agreement=min_greedy)
    report["data"] = source
    if not report["passed"]:
        ppl, greedy = report["perplexity"], report["greedy"]
        ratio = "non-finite" if ppl["ratio"] is None else f"{ppl['ratio']:.4f}"
        raise EdgePruneError(
            f"{config.quantize} decoder fails the quality gate against the fp32 export on {source}: perplexity "
            f"ratio {ratio} (max {max_ratio}), greedy agreement {greedy['agreement']:.3f} "
            f"(min {min_greedy}); try --quantize int8-weight or int4-weight with a smaller --block-size")
    return report


# --- runtime targets ---------------------------------------------------------------------------------------
def _kv_refusal(target) -> str:
    return (f"--target {target.name}: {target.display} compiles one engine per shape, so a decoder with a KV cache "
            "cannot run on it; add --no-past, or use onnxruntime")


def _target_file(target, selected: bool, final, current: Path, tmp: Path, kv_decoder: bool, quantization: str,
                 variants: list) -> str | None:
    """The file a runtime loads from this export (its manifest role): the onnxruntime file when the runtime
    accepts it, else (only for the selected --target) a dense copy it accepts; None when it gets none."""
    import onnx

    from edgeprune.core.onnxio import save_onnx
    from edgeprune.exporters.sparse import variant_record
    from edgeprune.exporters.validate import check_onnx_file

    if kv_decoder and not target.kv_cache:  # the runtime refuses to generate with a KV-cache decoder
        if selected:
            raise EdgePruneError(_kv_refusal(target))
        return None
    if target.ready is None or not target.ready(final):
        return DEFAULT_ONNX
    if not selected:
        return None
    dense_copy = onnx.load(str(current))  # the pre-sparsification file: dense with zeros
    if target.max_ir is not None:
        dense_copy.ir_version = min(dense_copy.ir_version, target.max_ir)
    rewrites = target.rewrite(dense_copy) if target.rewrite is not None else {}
    problems = target.ready(dense_copy)
    if problems:
        raise EdgePruneError(f"cannot make a {target.display} file: {'; '.join(problems)}")
    save_onnx(dense_copy, tmp / DENSE_FILE)
    check_onnx_file(tmp / DENSE_FILE)
    variants.append(variant_record(tmp / DENSE_FILE, dense_copy, quantization, target.name))
    if rewrites:
        variants[-1]["rewrites"] = rewrites
    return DENSE_FILE


def _target_check(target, path: Path, ctx: _Context) -> dict[str, Any]:
    """The runtime's export-time compile check on one static shape; says so when it could not run."""
    import numpy as np

    from edgeprune.core.onnxio import ort_session, random_feeds

    names = [i.name for i in ort_session(path).get_inputs()]
    # Decoders: one prefill step with a short past (static-shape runtimes compile one shape).
    feeds = random_feeds(names, 1, 16, 4 if ctx.decoder else 0, ctx.vocab_size, ctx.layout,
                         np.random.default_rng(5), ctx.type_vocab)
    report = target.check(path, feeds)
    if not report["checked"]:  # said on every run, not only in the manifest
        print(f"edgeprune: warning: {path.name} was not compile-checked with {target.display}: "
              f"{report['reason']} ({target.install_hint})", file=sys.stderr, flush=True)
    return report


# --- pipeline -----------------------------------------------------------------------------------------------
def _prepare_from_model(source, config: ExportConfig, tmp: Path, work: Path, allow_pickle: bool):
    from edgeprune.core.onnxio import move_onnx
    from edgeprune.exporters.onnx_export import ONNX_FILE, export_with_optimum
    from edgeprune.exporters.validate import torch_reference
    from edgeprune.core.loading import load_model

    started = time.perf_counter()
    loaded = load_model(source, task=None if config.task == "auto" else config.task, allow_pickle=allow_pickle)
    load_s = time.perf_counter() - started
    decoder = loaded.task == "text-generation"
    with_past = decoder and config.with_past
    info = export_with_optimum(loaded, tmp, loaded.task, with_past, config.opset)
    move_onnx(tmp / ONNX_FILE, work / "fp32.onnx")  # with its external data, if any
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
    from edgeprune.core.anatomy import analytic_flops, parameter_count

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
    from edgeprune.core.onnxio import external_files, save_onnx
    from edgeprune.exporters.sparse import densify
    from edgeprune.exporters.validate import check_onnx_file, onnx_reference

    model = check_onnx_file(onnx_path)
    from edgeprune.core.onnxio import opset_of

    opset = opset_of(model)
    if not SOURCE_ONNX_OPSETS[0] <= opset <= SOURCE_ONNX_OPSETS[1]:
        raise EdgePruneError(f"{onnx_path}: opset {opset} is outside what this exporter handles "
                             f"({SOURCE_ONNX_OPSETS[0]}..{SOURCE_ONNX_OPSETS[1]})")
    target = get_target(config.target)
    if target.max_opset is not None and opset > target.max_opset:
        raise EdgePruneError(f"{onnx_path}: opset {opset} > {target.max_opset}, which {target.display} does not "
                             f"support (--target {target.name}); re-export from the model with --opset {target.max_opset}")
    src_dir = onnx_path.parent
    if not (src_dir / "config.json").is_file():
        raise EdgePruneError(f"{src_dir}: no config.json beside {onnx_path.name}; an export directory needs one")
    weights = set(external_files(onnx_path))
    for item in src_dir.iterdir():  # config, tokenizer, generation config; not the ONNX files or manifest
        if item.is_file() and item.suffix != ".onnx" and item.name != MANIFEST and item not in weights \
                and not item.name.endswith((".onnx_data", ".onnx.data")):
            shutil.copy2(item, tmp / item.name)
    manifest = read_manifest(src_dir) if is_artifact(src_dir) else {}
    if any(n.domain not in ("", "ai.onnx") for n in model.graph.node) and (config.quantize != "none" or config.optimize):
        raise EdgePruneError(f"{onnx_path}: already optimised or quantised (non-standard operators); "
                             "re-export from the model or compressed artifact instead")
    densify(model)
    save_onnx(model, work / "fp32.onnx")
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


def _source_is_decoder(source: str | Path) -> bool:
    """Whether a source is a decoder, from what is on disk (config.json or a GGUF file); False if unknown."""
    from edgeprune.core.loading import ALIASES

    path = Path(source)
    if str(source) in ALIASES:
        return str(source) != "minilm"
    if path.suffix == ".gguf":
        return True
    config_path = (path.parent if path.is_file() else path) / "config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except (OSError, ValueError):
        return False
    manifest = read_manifest(config_path.parent) if is_artifact(config_path.parent) else {}
    if manifest.get("task"):
        return manifest["task"] == "text-generation"
    archs = " ".join(config.get("architectures") or [])
    return "ForCausalLM" in archs or "LMHead" in archs


@dataclass
class _Run:
    """The state one ONNX export's steps share: the current file, and what goes into the manifest."""

    config: ExportConfig
    ctx: _Context
    meta: dict[str, Any]
    work: Path
    tmp: Path
    say: Callable[[str], None]
    current: Path
    calib_sentences: int | None = None
    quantization: str = "none"
    steps: dict[str, Any] = field(default_factory=dict)
    validation: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def timed(self, key: str):
        started = time.perf_counter()
        yield
        self.timings[key] = round(time.perf_counter() - started, 3)

    def gate(self, path: Path, label: str) -> None:
        """Numerical gate of ``path`` against the reference (plus greedy generation for decoders)."""
        from edgeprune.exporters.validate import generation_gate, numeric_gate

        ctx, config = self.ctx, self.config
        with self.timed(f"validate_{label}_s"):
            self.say(f"validating {label} against {ctx.reference_name}")
            self.validation[label] = numeric_gate(path, ctx.reference, ctx.vocab_size, ctx.layout, ctx.decoder,
                                                  config.atol, config.rtol, seed=config.seed + 1234,
                                                  type_vocab=ctx.type_vocab, what=ctx.reference_name)
            if ctx.decoder and ctx.model is not None:
                self.validation[label]["generation"] = generation_gate(path, ctx.model, ctx.layout, ctx.vocab_size)


def _simplify_step(run: _Run) -> None:
    if not run.config.simplify:
        return
    from edgeprune.exporters.simplify import simplify

    with run.timed("simplify_s"):
        run.say("folding shape arithmetic")
        run.steps["simplify"] = simplify(run.current, run.work / "simplified.onnx")
    if run.steps["simplify"]["nodes_after"] < run.steps["simplify"]["nodes_before"]:
        run.current = run.work / "simplified.onnx"
        run.gate(run.current, "simplified")


def _optimize_step(run: _Run) -> None:
    if not run.config.optimize:
        return
    from edgeprune.exporters import optimize as opt

    with run.timed("optimize_s"):
        run.say("fusing the graph (onnxruntime transformer optimizer)")
        run.steps["optimize"] = opt.optimize(run.current, run.work / "optimized.onnx", run.ctx.decoder,
                                             quantized=run.config.quantize != "none")
        run.current = run.work / "optimized.onnx"
    run.gate(run.current, "optimized")


def _to_deepsparse_int8(path: Path) -> dict[str, Any]:
    """Rewrite the static QDQ file at ``path`` into MatMulInteger form in place (exporters/deepsparse_int8.py)."""
    import onnx

    from edgeprune.core.onnxio import check_onnx_model, save_onnx
    from edgeprune.exporters.deepsparse_int8 import qdq_to_matmulinteger

    model = onnx.load(str(path))
    info = qdq_to_matmulinteger(model)
    save_onnx(model, path)
    check_onnx_model(model, path)
    return info


def _quantize_step(run: _Run) -> None:
    config, ctx = run.config, run.ctx
    if config.quantize == "none":
        return
    from edgeprune.core.onnxio import ort_session
    from edgeprune.exporters import quantize as quant
    from edgeprune.exporters.validate import task_gate

    current = run.current
    with run.timed("quantize_s"):
        run.say(f"quantizing ({config.quantize})")
        names = [i.name for i in ort_session(current).get_inputs()]
        quantized = run.work / f"{config.quantize}.onnx"  # its name appears in gate errors
        if config.quantize == "int8-dynamic":
            run.steps["quantize"] = quant.quantize_dynamic(current, quantized, config.per_channel)
        elif config.quantize in WEIGHT_ONLY_BITS:
            spec = _weight_only_spec(config)
            if spec.algorithm == "gptq" and ctx.tokenizer is None and config.weight_algorithm == "auto":
                run.say("no tokenizer beside the model for GPTQ's calibration text: int4-weight uses HQQ")
                spec = _weight_only_spec(config.replace(weight_algorithm="hqq"))
            calibration, calibration_source = (_gptq_calibration(ctx, config, names, run.meta.get("with_past"))
                                               if spec.algorithm == "gptq" else (None, None))
            run.steps["quantize"] = quant.quantize_weight_only(current, quantized, spec, calibration)
            if calibration_source:
                run.steps["quantize"]["calibration"] = {"source": calibration_source}
        else:
            if ctx.tokenizer is None:
                raise EdgePruneError("int8-static needs the tokenizer beside the model for --calib text")
            batches = _calibration_batches(ctx, config.calib, names, config)
            run.steps["quantize"] = quant.quantize_static(current, quantized, batches, config.per_channel)
            if config.target == "deepsparse":  # DeepSparse 1.8 aborts on the QDQ form; give it SparseML's form
                run.steps["quantize"]["deepsparse_form"] = _to_deepsparse_int8(quantized)
            run.steps["quantize"]["calibration"] = {"source": config.calib, "samples_requested": config.calib_samples,
                                                    "samples_used": run.calib_sentences}
    label = "weight_only" if config.quantize in WEIGHT_ONLY_BITS else "int8"
    with run.timed(f"validate_{label}_s"):
        run.say(f"checking the {config.quantize} model against the fp32 export")
        if ctx.task == "text-generation":
            run.validation[label] = _decoder_gate(quantized, current, ctx, config, run.meta["with_past"])
        else:
            check, check_source = _check_batches(ctx, names, config)
            run.validation[label] = task_gate(quantized, current, ctx.task, check, config.min_cosine, config.min_top1)
            run.validation[label]["data"] = check_source
    run.quantization = config.quantize
    run.current = quantized


# The graph rewrites, in order; each validates its output before the next one runs.
# Fusion before folding: the attention fusion matches the unfolded reshape chains (0 Attention on folded graphs).
ONNX_STEPS: tuple[Callable[[_Run], None], ...] = (_optimize_step, _simplify_step, _quantize_step)


def _weight_only_spec(config: ExportConfig):
    """The weight-only settings an export config asks for, ``auto`` resolved (see ExportConfig)."""
    from edgeprune.exporters.quantize import WeightOnlySpec

    bits = WEIGHT_ONLY_BITS[config.quantize]
    algorithm = config.weight_algorithm
    if algorithm == "auto":
        algorithm = "gptq" if bits == 4 else "rtn"
    head_bits = config.lm_head_bits
    if head_bits is None:
        head_bits = 8 if algorithm in ("hqq", "gptq") else bits
    # the embedding table at the LM head's 8 bits when the head has them (a tied table is the same matrix);
    # measured on the 25 % pruned SmolLM2, GPTQ: int4 table +0.55 % perplexity vs fp32 (docs/export.md)
    embedding_bits = (8 if 8 in (bits, head_bits) else 4) if config.quantize_embeddings else 0
    return WeightOnlySpec(bits=bits, block_size=config.weight_block_size, symmetric=config.weight_symmetric,
                          accuracy_level=config.accuracy_level, embedding_bits=embedding_bits,
                          algorithm=algorithm, head_bits=head_bits)


def _write_final(run: _Run):
    """The onnxruntime file: sparse initializers where they pay (after quantization, never before), checked
    against its dense source."""
    import onnx

    from edgeprune.core.onnxio import save_onnx
    from edgeprune.exporters.sparse import sparsify

    config, tmp = run.config, run.tmp
    final = onnx.load(str(run.current))
    sparsify(final, config.sparse_initializers)
    run.steps["sparse_initializers"] = {"mode": config.sparse_initializers, "tensors": len(final.graph.sparse_initializer)}
    save_onnx(final, tmp / DEFAULT_ONNX)
    if final.graph.sparse_initializer:
        run.say(f"checking the sparse-initializer file ({len(final.graph.sparse_initializer)} sparse tensors)")
        worst = _max_abs_vs_current(run, tmp / DEFAULT_ONNX)
        run.validation["sparse_initializers"] = {"max_abs_vs_dense": worst, "passed": worst <= 1e-5}
        if worst > 1e-5:
            raise EdgePruneError(f"sparse-initializer file differs from its dense source (max abs {worst:.3g})")
    return final


def _max_abs_vs_current(run: _Run, candidate: Path) -> float:
    """Largest output difference (onnxruntime, random feeds) between ``candidate`` and the current file."""
    import numpy as np

    from edgeprune.core.onnxio import ort_session, random_feeds, run_session
    from edgeprune.exporters.validate import compare

    ctx = run.ctx
    session, reference = ort_session(candidate), ort_session(run.current)
    rng = np.random.default_rng(run.config.seed + 99)
    names = [i.name for i in session.get_inputs()]
    feeds = random_feeds(names, 2, 9, 3 if ctx.decoder and ctx.layout and run.meta["with_past"] else 0,
                         ctx.vocab_size, ctx.layout, rng, ctx.type_vocab)
    errors = compare(run_session(reference, feeds), run_session(session, feeds))
    return max(e["max_abs"] for e in errors.values())


def _runtime_files(run: _Run, final, target) -> tuple[dict[str, str | None], list]:
    """Every ONNX runtime's file role, and the selected runtime's export-time check."""
    from edgeprune.exporters.sparse import variant_record

    variants = [variant_record(run.tmp / DEFAULT_ONNX, final, run.quantization, "onnxruntime")]
    kv_decoder = run.ctx.decoder and bool(run.meta["with_past"])
    roles = {t.name: _target_file(t, t.name == run.config.target, final, run.current, run.tmp, kv_decoder,
                                  run.quantization, variants) for t in export_targets("onnx")}
    rewritten = [v for v in variants if v["role"] == target.name and any(v.get("rewrites", {}).values())]
    if rewritten:  # the graph the runtime gets was rewritten: it must still compute what its source does
        worst = _max_abs_vs_current(run, run.tmp / rewritten[0]["file"])
        run.validation[f"{target.name}_rewrites"] = {**rewritten[0]["rewrites"], "max_abs_vs_source": worst,
                                                     "passed": worst <= 1e-5}
        if worst > 1e-5:
            raise EdgePruneError(f"the {target.display} file differs from its source after its graph rewrites "
                                 f"(max abs {worst:.3g})")
    if target.check is not None:
        run.say(f"compiling with {target.display} (if its environment exists)")
        with run.timed(f"{target.name}_check_s"):
            run.validation[target.name] = _target_check(target, run.tmp / roles[target.name], run.ctx)
    return roles, variants


def _check_request(source, out: Path, config: ExportConfig, overwrite: bool, target) -> tuple[ExportConfig, int | None]:
    """Everything checkable before the slow export; returns the config with --calib resolved to a file."""
    if Path(source).exists() and Path(source).resolve() == out.resolve():
        raise EdgePruneError("the output directory must differ from the source")
    check_output_dir(out, overwrite)
    if not target.kv_cache and config.with_past and _source_is_decoder(source):
        raise EdgePruneError(_kv_refusal(target))
    if target.file_format != "gguf" and _onnx_source(source) is None:
        _check_onnx_export_fits_memory(source)
    config = _resolve_gptq_data(config)
    if not config.calib:
        return config, None
    from edgeprune.core.data_sources import resolve_data
    from edgeprune.core.datasets import read_sentences

    config = config.replace(calib=str(resolve_data(config.calib)))  # a file or a key such as stsb:train
    calib_sentences = len(read_sentences(config.calib, limit=config.calib_samples))  # before the slow export
    if config.quantize == "int8-static":
        from edgeprune.compress.calibration import warn_if_few

        warn_if_few(calib_sentences, config.calib_samples, config.calib)
    return config, calib_sentences


def _resolve_gptq_data(config: ExportConfig) -> ExportConfig:
    """GPTQ without --calib reads the default calibration text; check it is reachable before the slow work.
    When it is not, ``auto`` falls back to HQQ (no data needed) with one line; an explicit ``gptq`` fails."""
    import sys

    from edgeprune.core.data_sources import resolve_data

    if config.calib or config.quantize not in WEIGHT_ONLY_BITS or _weight_only_spec(config).algorithm != "gptq":
        return config
    try:
        resolve_data(DEFAULT_CHECK_DATA)
    except EdgePruneError as exc:
        if config.weight_algorithm == "gptq":
            raise EdgePruneError(f"--weight-algorithm gptq needs calibration text: pass --calib PATH ({exc})") from None
        print(f"edgeprune: int4-weight uses HQQ, not GPTQ: no calibration text ({exc}); pass --calib PATH for GPTQ",
              file=sys.stderr)
        return config.replace(weight_algorithm="hqq")
    return config


# The in-memory ONNX export (trace, optimum's post-processing, shape folding, the gate's ORT sessions beside
# the PyTorch model) peaks at this multiple of the float32 weights; measured in benchmarks/RESULTS.md
# ("ONNX external data": 9.69 GB for a 0.57 B Llama's 2.27 GB, 4.27x). A model whose peak would exceed the
# available memory is refused before loading.
ONNX_EXPORT_PEAK_RATIO = 4.3


def _check_onnx_export_fits_memory(source) -> None:
    import psutil

    from edgeprune.compress.lazy_weights import checkpoint_numel
    from edgeprune.core.loading import resolve

    try:
        resolved = resolve(source)
    except EdgePruneError:
        return  # loading reports it
    numel = checkpoint_numel(resolved)
    if numel is None:
        return
    need, available = numel * 4 * ONNX_EXPORT_PEAK_RATIO, psutil.virtual_memory().available
    if need > available:
        raise EdgePruneError(
            f"{source}: {numel / 1e9:.2f} B parameters; the ONNX export traces the model in memory and needs "
            f"~{need / 1e9:.1f} GB ({ONNX_EXPORT_PEAK_RATIO:g}x the float32 weights), more than the "
            f"{available / 1e9:.1f} GB available; export it with --target llamacpp (GGUF, streamed from the shards)")


def export(source: str | Path, out: str | Path, config: ExportConfig | None = None, overwrite: bool = False,
           allow_pickle: bool = False, progress: bool = True, streaming: bool | None = None) -> Path:
    """Export ``source`` (alias, model dir, compressed artifact, export dir or .onnx) to ``out``; returns ``out``.

    ``streaming`` (GGUF only): True writes the file tensor by tensor from the checkpoint's shards, never the
    whole model in memory; None chooses it when loading would not fit."""
    from edgeprune.exporters.onnx_export import io_signature
    from edgeprune.exporters.validate import check_onnx_file

    config = config or ExportConfig()
    out = Path(out)
    target = get_target(config.target)
    if streaming and target.file_format != "gguf":
        raise EdgePruneError("--streaming writes GGUF files (--target llamacpp); the ONNX export traces the model "
                             "in memory (docs/sequential.md gives its peak)")
    config, calib_sentences = _check_request(source, out, config, overwrite, target)
    if target.file_format == "gguf":
        from edgeprune.exporters.gguf_api import export_gguf

        return export_gguf(source, out, config, overwrite=overwrite, allow_pickle=allow_pickle, progress=progress,
                           streaming=streaming)

    def say(message: str) -> None:
        if progress:
            print(f"[export] {message}", file=sys.stderr, flush=True)

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
        run = _Run(config, ctx, meta, work, tmp, say, work / "fp32.onnx", calib_sentences)
        run.timings["export_s"] = round(time.perf_counter() - step, 3)
        check_onnx_file(run.current)
        run.gate(run.current, "fp32")
        for onnx_step in ONNX_STEPS:
            onnx_step(run)
        final = _write_final(run)
        roles, variants = _runtime_files(run, final, target)
        run.timings["total_s"] = round(time.perf_counter() - started, 3)
        write_manifest(
            tmp, "export", config.to_dict(), parent,
            task=ctx.task, with_past=bool(meta["with_past"]), files_by_role=roles, variants=variants,
            validation=run.validation, kv_layout=ctx.layout if ctx.decoder else None,
            io=io_signature(tmp / DEFAULT_ONNX), steps=run.steps, model_type=meta["model_type"],
            source_kind=meta["source_kind"], optimum=meta.get("optimum"), timings=run.timings,
            model_stats=meta.get("model_stats"),
        )
        say(f"wrote {out}")
    return out
