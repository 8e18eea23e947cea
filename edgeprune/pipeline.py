"""``edgeprune pipeline`` (compress -> export -> bench from one YAML recipe) and ``edgeprune sweep``
(Pareto sweep over pruning levels with a budget search that returns the chosen artifact)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeprune.bench.harness import BenchConfig
from edgeprune.core.configs import FrozenConfig
from edgeprune.core.data_sources import resolve_data, resolve_data_or_name
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.recipe_catalog import RECIPES_DIR, resolve_recipe

POSTTRAINING_RECIPE = RECIPES_DIR / "minilm-50-posttraining.yaml"
DISTILL_RECIPE = RECIPES_DIR / "minilm-60-distill.yaml"
# The best trade-off the pipeline names: the fastest variant within this fraction of dense quality.
BEST_TRADEOFF_MIN_QUALITY = 0.99


@dataclass(frozen=True)
class Variant(FrozenConfig):
    """One model to build and measure. ``compress``/``recipe`` make a compressed artifact; ``reuse`` takes
    another variant's compressed artifact (e.g. to quantize it); neither means the source model itself."""

    name: str = ""
    recipe: str | None = None  # compress recipe YAML (edgeprune compress --recipe)
    compress: dict | None = None  # inline compress recipe (same keys as the YAML)
    reuse: str | None = None
    export: dict = field(default_factory=dict)  # ExportConfig fields (quantize, target, optimize, ...)
    calib: str | None = None  # calibration data for the recipe: a built-in key (stsb:train) or a file
    finetune: str | None = None  # fine-tuning / distillation data for the recipe (same); "none": no fine-tuning
    requires_runtime: str | None = None  # skip (with a note) when this runtime is unavailable

    def __post_init__(self):
        if not self.name or "/" in self.name:
            raise EdgePruneError(f"variant names must be non-empty and contain no '/': {self.name!r}")
        if sum(x is not None for x in (self.recipe, self.compress, self.reuse)) > 1:
            raise EdgePruneError(f"variant {self.name}: give at most one of recipe, compress, reuse")


@dataclass(frozen=True)
class PipelineConfig(FrozenConfig):
    model: str = "minilm"
    task: str | None = "sts"  # quality task for the benchmark (sts | perplexity | null)
    data: str | None = "stsb:dev"  # a built-in data key (edgeprune data list) or a file
    eval_limit: int | None = None
    variants: tuple[Variant, ...] = ()
    bench: BenchConfig = field(default_factory=BenchConfig)
    optional_runtimes: tuple[str, ...] = ()  # added to bench.runtimes when installed (e.g. deepsparse)

    def __post_init__(self):
        if not self.variants:
            raise EdgePruneError("a pipeline needs at least one variant (the first is the dense reference)")
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise EdgePruneError(f"variant names must be unique: {names}")
        for v in self.variants:
            if v.reuse and v.reuse not in names[: names.index(v.name)]:
                raise EdgePruneError(f"variant {v.name}: reuse {v.reuse!r} must name an earlier variant")
        if self.variants[0].requires_runtime:
            raise EdgePruneError("the first (dense reference) variant cannot be optional")


def default_recipe() -> PipelineConfig:
    """The README main job: MiniLM dense and distilled at 60 % of block FLOPs removed: fp32 (also run on
    DeepSparse when it is installed), fp32 fused (``--optimize``, the faster fp32 file on onnxruntime), INT8 fused,
    and DeepSparse's INT8 form when DeepSparse is installed; it prints the best fp32, INT8 and DeepSparse
    variant. The post-training 50 % and the 90 %
    unstructured variants are no longer built by default: the distilled model was as fast at higher quality,
    and 90 % unstructured reached 88.9 % of dense quality (never within 1 %) for ~3.5 min of fine-tuning
    (benchmarks/RESULTS.md)."""
    distilled = ({"name": "distilled-60", "recipe": str(DISTILL_RECIPE)} if DISTILL_RECIPE.is_file()
                 else {"name": "distilled-60", "compress": {"structured": {"flops_budget": 0.4}}})
    variants = [
        {"name": "dense", "export": {"target": "deepsparse"}},
        distilled,
        {"name": "distilled-60-fused", "reuse": "distilled-60", "export": {"optimize": True}},
        # INT8 fused (QAttention, quantized embeddings): same STS as the unfused INT8 (86.05) and faster in both
        # interleaved A/Bs (per-round 4.79x vs 4.62x dense on Zen 4, 3.31x vs 2.94x earlier; RESULTS.md)
        {"name": "distilled-60-fused-int8", "reuse": "distilled-60",
         "export": {"optimize": True, "quantize": "int8-dynamic"}},
        # DeepSparse's own INT8 form (MatMulInteger, static scales): its fastest file at >= 99 % of dense
        # (2.70x dense ORT fp32 against 2.01x for fp32 on an AMX/VNNI host; a 4 s export)
        {"name": "distilled-60-ds-int8", "reuse": "distilled-60", "requires_runtime": "deepsparse",
         "export": {"target": "deepsparse", "quantize": "int8-static", "calib": "stsb:train"}},
    ]
    return PipelineConfig.from_dict({
        "model": "minilm", "task": "sts", "data": "stsb:dev", "variants": variants,
        "bench": {"runtimes": ["onnxruntime"], "batches": [1], "seqs": [128], "threads": 2, "rounds": 16,
                  "round_seconds": 0.6},
        "optional_runtimes": ["deepsparse"],
    })


def _runtime_available(name: str) -> bool:
    from edgeprune.runtime.base import get_runtime

    try:
        return get_runtime(name, require_available=False).available()
    except EdgePruneError:
        return False


def variant_compress_config(variant: Variant, recipe_dir: Path | None = None):
    """The compress recipe of a ``recipe``/``compress`` variant with its ``calib``/``finetune`` applied."""
    from edgeprune.compress.api import CompressConfig

    cfg = (CompressConfig.from_file(resolve_recipe(variant.recipe, recipe_dir)) if variant.recipe
           else CompressConfig.from_dict(variant.compress, where=f"variant {variant.name}.compress"))
    if variant.calib:
        cfg = cfg.replace(calibration=cfg.calibration.replace(path=variant.calib))
    if variant.finetune:
        cfg = cfg.replace(finetune=cfg.finetune.replace(
            data=None if variant.finetune.lower() == "none" else variant.finetune))
    return cfg


def variant_configs(config: PipelineConfig, recipe_dir: Path | None = None) -> dict[str, tuple[Any, Any]]:
    """Every variant's compress and export configs, built (and so validated) before the first variant runs:
    a bad ratio in the last variant must not surface after the first ones were built."""
    from edgeprune.compress.api import check_options
    from edgeprune.exporters.api import ExportConfig

    configs: dict[str, tuple[Any, Any]] = {}
    for variant in config.variants:
        cfg = None
        if not variant.reuse and (variant.recipe or variant.compress):
            cfg = variant_compress_config(variant, recipe_dir)
            try:
                check_options(cfg)
            except EdgePruneError as exc:
                raise EdgePruneError(f"variant {variant.name}: {exc}") from None
        fields = dict(variant.export)
        if config.task == "perplexity":
            fields.setdefault("task", "text-generation")
        configs[variant.name] = (cfg, ExportConfig.from_dict(fields, where=f"variant {variant.name}.export"))
    return configs


def check_data(config: PipelineConfig, recipe_dir: Path | None = None) -> str | None:
    """Resolve every data reference (evaluation data first: it needs no torch import) before any work, so a
    data set that is not reachable fails in seconds, not after the first variants are built. Returns the
    evaluation data file."""
    data = str(resolve_data(config.data)) if config.task else None
    for variant in config.variants:
        if variant.recipe or variant.compress:
            cfg = variant_compress_config(variant, recipe_dir)
            for ref in (cfg.calibration.path, cfg.finetune.data):
                if ref is not None and ref != "teacher":  # teacher-generated data is sampled, not read
                    resolve_data_or_name(ref)
    return data


def _best_row(rows: list[dict], min_quality: float) -> dict | None:
    ok = [c for c in rows if c.get("quality_ratio") is not None and c.get("p50_ms") is not None
          and c["quality_ratio"] >= min_quality]
    if not ok:
        return None
    best = min(ok, key=lambda c: c["p50_ms"])
    return {"model": best["model"], "runtime": best["runtime"], "batch": best["batch"], "seq": best["seq"],
            "p50_ms": best["p50_ms"], "speedup": best.get("speedup_p50"),
            "speedup_rounds_median": (best.get("speedup_rounds") or {}).get("median"),
            "quality": best.get("quality"), "quality_ratio": best["quality_ratio"],
            "rule": f"fastest variant with quality >= {min_quality:.0%} of dense"}


def best_tradeoff(comparisons: list[dict], min_quality: float = BEST_TRADEOFF_MIN_QUALITY) -> dict | None:
    """The fastest variant whose quality is within ``1 - min_quality`` of dense, at the first runtime, batch
    and sequence length measured (the README table's shape); None when no quality was measured."""
    rows = [c for c in comparisons if c.get("quality_ratio") is not None and c.get("p50_ms") is not None]
    if not rows:
        return None
    key = (rows[0]["runtime"], rows[0]["batch"], rows[0]["seq"])
    return _best_row([c for c in rows if (c["runtime"], c["batch"], c["seq"]) == key], min_quality)


def variant_precisions(config: PipelineConfig) -> dict[str, str]:
    """``int8`` for variants exported with an INT8 quantization, else ``fp32`` (weight-only int4 counts as
    int8's kind: both are quantized files)."""
    return {v.name: "fp32" if v.export.get("quantize", "none") == "none" else "int8" for v in config.variants}


def best_by_kind(comparisons: list[dict], precisions: dict[str, str],
                 min_quality: float = BEST_TRADEOFF_MIN_QUALITY) -> dict[str, dict | None]:
    """The fastest variant within ``1 - min_quality`` of dense for each kind the main job shows: fp32 and
    INT8 on the first runtime, and each further runtime (e.g. deepsparse) as one kind, each at that runtime's
    first batch and sequence length."""
    rows = [c for c in comparisons if c.get("quality_ratio") is not None and c.get("p50_ms") is not None]
    if not rows:
        return {}
    first = rows[0]["runtime"]
    shapes: dict[str, tuple] = {}
    for c in rows:
        shapes.setdefault(c["runtime"], (c["batch"], c["seq"]))
    at_shape = [c for c in rows if (c["batch"], c["seq"]) == shapes[c["runtime"]]]
    kinds: dict[str, list[dict]] = {f"{first} fp32": [], f"{first} int8": []}
    for c in at_shape:
        kind = f"{first} {precisions.get(c['model'], 'fp32')}" if c["runtime"] == first else c["runtime"]
        kinds.setdefault(kind, []).append(c)
    return {kind: _best_row(group, min_quality) for kind, group in kinds.items()}


def _describe(best: dict) -> str:
    rounds = best.get("speedup_rounds_median")
    return (f"{best['model']}, p50 {best['p50_ms']:.2f} ms = {best['speedup'] or float('nan'):.2f}x dense"
            + (f" (median per-round {rounds:.2f}x)" if rounds is not None else "")
            + f", quality {best['quality']:.2f} = {best['quality_ratio']:.1%} of dense")


def build_variants(config: PipelineConfig, work: Path, log: Callable[[str], None] = print,
                   recipe_dir: Path | None = None, configs: dict[str, tuple[Any, Any]] | None = None,
                   executor=None) -> tuple[list[tuple[str, Path]], dict[str, Any]]:
    """Compress and export every variant under ``work``. Returns [(name, export dir)] and timings/notes.
    ``configs``: the variants' configs from ``variant_configs`` when the caller already built them;
    ``executor``: an ``executors.ExecutorConfig`` (default: here, one after the other)."""
    from edgeprune.bench.executors import ExecutorConfig, run_builds

    configs = configs if configs is not None else variant_configs(config, recipe_dir)
    notes: dict[str, Any] = {}
    names: list[str] = []
    for variant in config.variants:
        if variant.requires_runtime and not _runtime_available(variant.requires_runtime):
            notes[variant.name] = {"skipped": f"needs runtime {variant.requires_runtime}, which is not available"}
            log(f"skipping {variant.name}: runtime {variant.requires_runtime} not available")
        else:
            names.append(variant.name)
    variants = {v.name: v for v in config.variants}
    depends = {name: (variants[name].reuse if variants[name].reuse in names else None) for name in names}
    build = _VariantBuild(config.model, {name: (variants[name], *configs[name]) for name in names}, log,
                          reference=config.variants[0].name)
    results = run_builds(names, depends, build, work, executor or ExecutorConfig(), log)
    built = [(name, Path(results[name].pop("export"))) for name in names if "failed" not in results[name]]
    notes.update(results)
    return built, {name: notes[name] for name in variants if name in notes}


class _VariantBuild:
    """compress -> export of one variant (a picklable callable, so a Ray task can run it on any host). A
    candidate that fails (a quantization gate refuses it, its recipe cannot reach its budget) is recorded as
    ``{"failed": message}`` and left out of the benchmark, so one refusal does not throw away the other
    variants' builds; the dense ``reference`` failing stops the pipeline."""

    def __init__(self, model: str, specs: dict[str, tuple[Any, Any, Any]], log: Callable[[str], None],
                 reference: str = "") -> None:
        self.model, self.specs, self.log, self.reference = model, specs, log, reference

    def __call__(self, name: str, work: Path, reused: dict | None) -> dict:
        variant = self.specs[name][0]
        if reused is not None and "failed" in reused:
            self.log(f"[{name}] not built: the variant it reuses, {variant.reuse}, failed")
            return {"failed": f"the variant it reuses, {variant.reuse}, failed"}
        try:
            return self._build(name, work, reused)
        except EdgePruneError as exc:
            if name == self.reference:
                raise
            self.log(f"[{name}] failed, left out of the benchmark: {exc}")
            return {"failed": str(exc)}

    def _build(self, name: str, work: Path, reused: dict | None) -> dict:
        from edgeprune.compress.api import compress
        from edgeprune.exporters.api import export

        variant, cfg, export_cfg = self.specs[name]
        started = time.perf_counter()
        source = self.model
        if variant.reuse:
            # Quantizing (or re-targeting) an earlier variant starts from its validated fp32 export, which
            # skips a second PyTorch -> ONNX export; the exporter checks the result against that file. Fusion
            # starts from the model: that export's shape folding hides the attention pattern from the fuser.
            if reused is None:
                source = self.model
            else:
                source = reused["source"] if export_cfg.optimize else reused["export"]
        elif cfg is not None:
            out = Path(work) / "compressed" / name
            self.log(f"[{name}] compress {self.model}")
            compress(self.model, out, cfg)
            source = str(out)
        compress_s = time.perf_counter() - started
        export_dir = Path(work) / "exports" / name
        self.log(f"[{name}] export {source} ({dict(variant.export) or 'fp32'})")
        step = time.perf_counter()
        export(source, export_dir, export_cfg)
        return {"compress_s": round(compress_s, 1), "export_s": round(time.perf_counter() - step, 1),
                "source": source, "export": str(export_dir)}


def run_pipeline(config: PipelineConfig, out: str | Path, overwrite: bool = False, threads: int | None = None,
                 log: Callable[[str], None] = print, recipe_dir: Path | None = None,
                 finish: Callable[[Path, dict], None] | None = None, executor=None) -> dict[str, Any]:
    """compress -> export -> bench; everything lands in ``out`` (atomically), the table is printed.
    ``finish(staging_dir, summary)`` adds files (e.g. the sweep's choice) before the output is renamed.
    ``executor`` (``executors.ExecutorConfig``): where the variants are built; they are timed here."""
    from edgeprune.bench.executors import ExecutorConfig, executor_summary, preflight
    from edgeprune.core.artifacts import check_output_dir, staged_output, write_manifest
    from edgeprune.bench.api import bench
    from edgeprune.bench.report import markdown

    check_output_dir(out, overwrite)
    if threads is not None and threads < 1:
        raise EdgePruneError(f"--threads must be >= 1 (got {threads})")
    data = check_data(config, recipe_dir)
    runtimes = tuple(config.bench.runtimes) + tuple(
        r for r in config.optional_runtimes if r not in config.bench.runtimes and _runtime_available(r))
    bench_cfg = config.bench.replace(task=config.task, data=data, eval_limit=config.eval_limit, runtimes=runtimes,
                                     **({"threads": threads} if threads is not None else {}))
    configs = variant_configs(config, recipe_dir)  # every variant valid before the first is built
    executor = executor or ExecutorConfig()
    preflight(executor)  # Ray missing or its cluster unreachable: one line now, before any output exists
    started = time.perf_counter()
    with staged_output(out, overwrite) as tmp:
        built, notes = build_variants(config, tmp, log, recipe_dir, configs, executor)
        if len(built) < 2:
            raise EdgePruneError("the pipeline needs the dense variant and at least one candidate to compare")
        report = bench(str(built[0][1]), [str(p) for _, p in built[1:]], tmp / "report", bench_cfg,
                       labels=[name for name, _ in built], log=log)
        summary = {"output": str(out), "report": str(Path(out) / "report" / "report.json"), "variants": notes,
                   "seconds": round(time.perf_counter() - started, 1), "comparisons": report["comparisons"],
                   "best_tradeoff": best_tradeoff(report["comparisons"]),
                   "best_by_kind": best_by_kind(report["comparisons"], variant_precisions(config)),
                   "executor": executor_summary(executor, {k: v for k, v in notes.items() if "host" in v})}
        (tmp / "pipeline.yaml").write_text(config.to_yaml())
        (tmp / "summary.json").write_text(json.dumps(summary, indent=1, default=float) + "\n")
        if finish is not None:
            finish(tmp, summary)
        write_manifest(tmp, "pipeline", config.to_dict(), parent=None, variants=notes)
    print(markdown(report))
    for kind, best in summary["best_by_kind"].items():
        print(f"best {kind}: " + (_describe(best) if best is not None
                                  else f"no variant reaches {BEST_TRADEOFF_MIN_QUALITY:.0%} of dense quality"))
    best = summary["best_tradeoff"]
    if best is not None:
        print(f"best trade-off ({best['rule']}, {best['runtime']} batch {best['batch']} seq {best['seq']}): "
              + _describe(best))
    elif config.task:
        print(f"best trade-off: no variant reaches {BEST_TRADEOFF_MIN_QUALITY:.0%} of dense quality")
    hosts = summary["executor"]
    if executor.kind != "local":
        built_on = ", ".join(f"{name} on {host}" for name, host in hosts["built_on"].items())
        print(f"built by {executor.kind}: {built_on}; all timed on {hosts['timed_on']} ({hosts['timing']})")
    for name, note in notes.items():
        if "failed" in note:
            print(f"not benchmarked: {name}: {note['failed']}")
    print(f"pipeline finished in {summary['seconds']:.0f}s; report: {summary['report']}")
    return summary


# --- sweep ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SweepConfig(FrozenConfig):
    model: str = "minilm"
    task: str = "sts"
    data: str = "stsb:dev"
    eval_limit: int | None = 500
    # fraction removed: of heads and FFN neurons, or of block FLOPs when the base recipe uses a FLOPs budget
    levels: tuple[float, ...] = (0.25, 0.5, 0.7)
    base_recipe: str | None = None  # compress recipe whose structured heads/ffn (or flops_budget) the sweep sets
    calib: str | None = None  # calibration data for the base recipe: a built-in key (stsb:train) or a file
    quantize: tuple[str, ...] = ("none",)  # export variants per level: none, int8-dynamic
    bench: BenchConfig = field(default_factory=lambda: BenchConfig(threads=2, rounds=6))

    def __post_init__(self):
        if not self.levels or any(not 0.0 < x < 1.0 for x in self.levels):
            raise EdgePruneError("sweep levels must be fractions in (0, 1)")
        bad = set(self.quantize) - {"none", "int8-dynamic", "int8-static"}
        if bad:
            raise EdgePruneError(f"unknown quantize options in sweep: {sorted(bad)}")


def default_sweep() -> SweepConfig:
    if POSTTRAINING_RECIPE.is_file():
        return SweepConfig(base_recipe=str(POSTTRAINING_RECIPE), calib="stsb:train",
                           quantize=("none", "int8-dynamic"))
    return SweepConfig(quantize=("none", "int8-dynamic"))


def sweep_pipeline(config: SweepConfig) -> PipelineConfig:
    from edgeprune.compress.api import CompressConfig

    base = (CompressConfig.from_file(resolve_recipe(config.base_recipe)).to_dict() if config.base_recipe
            else CompressConfig().to_dict())
    by_budget = base["structured"].get("flops_budget") is not None
    variants: list[dict] = [{"name": "dense"}]
    for q in config.quantize:
        if q != "none":
            variants.append({"name": f"dense-{q}", "reuse": "dense", "export": {"quantize": q}})
    for level in config.levels:
        recipe = json.loads(json.dumps(base))
        if by_budget:
            recipe["structured"].update({"heads": 0.0, "ffn": 0.0, "flops_budget": round(1.0 - level, 6)})
        else:
            recipe["structured"].update({"heads": level, "ffn": level, "flops_budget": None})
        name = f"prune-{round(level * 100)}"
        variants.append({"name": name, "compress": recipe, **({"calib": config.calib} if config.calib else {})})
        for q in config.quantize:
            if q != "none":
                variants.append({"name": f"{name}-{q}", "reuse": name, "export": {"quantize": q}})
    return PipelineConfig.from_dict({"model": config.model, "task": config.task, "data": config.data,
                                     "eval_limit": config.eval_limit, "variants": variants,
                                     "bench": config.bench.to_dict()})


def pareto_front(points: list[dict]) -> list[dict]:
    """Points not dominated by another that is at least as fast and at least as good (and better in one)."""
    front = []
    for p in points:
        dominated = any(q is not p and q["p50_ms"] <= p["p50_ms"] and q["quality_ratio"] >= p["quality_ratio"]
                        and (q["p50_ms"] < p["p50_ms"] or q["quality_ratio"] > p["quality_ratio"]) for q in points)
        if not dominated:
            front.append(p)
    return sorted(front, key=lambda p: p["p50_ms"])


def choose(points: list[dict], min_quality: float | None, max_latency_ms: float | None) -> dict | None:
    """Budget search: the fastest variant with quality_ratio >= min_quality, or the best-quality variant
    with p50 <= max_latency_ms (both constraints apply when both are given)."""
    ok = [p for p in points
          if (min_quality is None or p["quality_ratio"] >= min_quality)
          and (max_latency_ms is None or p["p50_ms"] <= max_latency_ms)]
    if not ok:
        return None
    if min_quality is not None:
        return min(ok, key=lambda p: (p["p50_ms"], -p["quality_ratio"]))
    return max(ok, key=lambda p: (p["quality_ratio"], -p["p50_ms"]))


def run_sweep(config: SweepConfig, out: str | Path, min_quality: float | None = None,
              max_latency_ms: float | None = None, overwrite: bool = False, threads: int | None = None,
              log: Callable[[str], None] = print, executor=None) -> dict[str, Any]:
    if min_quality is not None and not 0 < min_quality <= 1.5:
        raise EdgePruneError("--min-quality is a fraction of dense quality, e.g. 0.98")
    if max_latency_ms is not None and not max_latency_ms > 0:
        raise EdgePruneError(f"--max-latency-ms must be > 0 (got {max_latency_ms})")
    pipeline = sweep_pipeline(config)
    cfg = pipeline.bench
    key = (cfg.runtimes[0], cfg.batches[0], cfg.seqs[-1])
    result: dict[str, Any] = {}

    def finish(tmp: Path, summary: dict) -> None:
        """The choice and sweep.json are written into the staging directory, so they land atomically with
        the rest (a full disk here leaves nothing, not a truncated chosen/ model)."""
        at_key = [c for c in summary["comparisons"] if (c["runtime"], c["batch"], c["seq"]) == key]
        points = [{"model": c["model"], "p50_ms": c["p50_ms"], "quality": c["quality"],
                   "quality_ratio": c["quality_ratio"], "speedup": c["speedup_p50"], "flops_ratio": c["flops_ratio"]}
                  for c in at_key if c["quality_ratio"] is not None]
        if not points:
            report = json.loads((tmp / "report" / "report.json").read_text())
            reasons = "; ".join(f"{m['label']}: {(m.get('quality') or {}).get('error') or 'no quality figure'}"
                                for m in report["models"])
            raise EdgePruneError(f"no variant has a quality figure, so none can be chosen ({reasons[:400]})")
        front = pareto_front(points)
        result.update({"output": str(out), "at": {"runtime": key[0], "batch": key[1], "seq": key[2]},
                       "points": points, "pareto": [p["model"] for p in front]})
        if min_quality is not None or max_latency_ms is not None:
            chosen = choose(points, min_quality, max_latency_ms)
            result["budget"] = {"min_quality": min_quality, "max_latency_ms": max_latency_ms}
            result["chosen"] = None
            if chosen is not None:
                shutil.copytree(tmp / "exports" / chosen["model"], tmp / "chosen")
                result["chosen"] = dict(chosen, path=str(Path(out) / "chosen"))
        (tmp / "sweep.json").write_text(json.dumps(result, indent=1, default=float) + "\n")

    summary = run_pipeline(pipeline, out, overwrite=overwrite, threads=threads, log=log, finish=finish,
                           executor=executor)
    result["executor"] = summary["executor"]
    chosen = result.get("chosen")
    if "budget" in result and chosen is None:
        print("no variant meets the budget")
    elif chosen is not None:
        print(f"chosen: {chosen['model']} (p50 {chosen['p50_ms']:.2f} ms, quality {chosen['quality_ratio']:.1%} of "
              f"dense) -> {chosen['path']}")
    print("Pareto frontier (latency x quality): " + ", ".join(result["pareto"]))
    return result
