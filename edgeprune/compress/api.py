"""``compress``: model source -> compressed artifact directory. Orchestration only; the math lives elsewhere."""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeprune.compress.depth import DepthConfig
from edgeprune.core.artifacts import check_output_dir, staged_output
from edgeprune.compress.plan import StructuredConfig
from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError


SPARSITY_PATTERNS = ("unstructured", "N:M", "4x4")


@dataclass(frozen=True)
class CalibrationConfig(FrozenConfig):
    """Calibration data for data-aware importance and reconstruction."""

    path: str | None = None  # STS tsv, plain text, or a `datasets` name / local data file
    samples: int = 256
    max_length: int = 128
    batch_size: int = 32

    def __post_init__(self):
        if self.samples < 1 or self.max_length < 2 or self.batch_size < 1:
            raise EdgePruneError("calibration samples, max_length and batch_size must be positive")


@dataclass(frozen=True)
class ReconstructConfig(FrozenConfig):
    """Layer-wise least-squares re-fit of the kept output projections after structured pruning."""

    enabled: bool = False
    # ridge term, relative to the mean diagonal of the Gram matrix; None: the best measured for the mode
    damping: float | None = None
    # scales: one scale per kept head/neuron (Kwon's mask tuning; the measured best, docs/quality-structured.md);
    # full: re-fit whole consumer weights (over-fits sentence embeddings: MiniLM 50 % 85.05 -> 57.52)
    mode: str = "scales"
    fit_bias: bool = True  # full mode: also re-fit the consumer bias

    def __post_init__(self):
        if self.mode not in ("full", "scales"):
            raise EdgePruneError(f"reconstruct mode must be full or scales (got {self.mode!r})")
        if self.damping is not None and self.damping < 0:
            raise EdgePruneError(f"reconstruct damping must be >= 0 (got {self.damping})")

    @property
    def ridge(self) -> float:
        """The damping used: as given, else 1.0 for scales and 0.01 for full (each mode's best measured)."""
        if self.damping is not None:
            return self.damping
        return 1.0 if self.mode == "scales" else 1e-2


@dataclass(frozen=True)
class SparsityConfig(FrozenConfig):
    """Unstructured / semi-structured sparsity; zeros stay in dense tensors."""

    fraction: float = 0.0
    pattern: str = "unstructured"  # unstructured | N:M (e.g. "2:4") | 4x4 (blocks)
    scope: str = "local"  # local (per tensor) | global (one threshold across tensors)
    steps: int = 1  # iterative schedule: reach `fraction` in K steps
    finetune_each_step: bool = False
    schedule: str = "cubic"  # cubic | linear ramp of the per-step target
    importance: str = "magnitude"  # magnitude | movement (scores from fine-tuning; needs finetune data)
    # Also sparsify the input embedding table. It is most of a small encoder's file (47 of 90 MB in MiniLM),
    # so sparse-initializer files only get small with it; it costs more quality than block weights.
    embeddings: bool = False

    def __post_init__(self):
        from edgeprune.compress.sparsity import check_pattern

        if not 0.0 <= self.fraction < 1.0:
            raise EdgePruneError(f"--sparsity must be in [0, 1) (got {self.fraction})")
        if self.scope not in ("local", "global"):
            raise EdgePruneError(f"--scope must be local or global (got {self.scope!r})")
        if self.steps < 1:
            raise EdgePruneError(f"--steps must be >= 1 (got {self.steps})")
        if self.schedule not in ("cubic", "linear"):
            raise EdgePruneError(f"sparsity schedule must be cubic or linear (got {self.schedule!r})")
        if self.importance not in ("magnitude", "movement"):
            raise EdgePruneError(f"sparsity importance must be magnitude or movement (got {self.importance!r})")
        check_pattern(self.pattern, self.fraction)

    @property
    def active(self) -> bool:
        return self.fraction > 0 or self.pattern not in ("unstructured", "4x4")


@dataclass(frozen=True)
class FinetuneConfig(FrozenConfig):
    """Recovery fine-tuning, optionally distilling from the dense model."""

    data: str | None = None
    epochs: float = 1.0
    distill: bool = False
    learning_rate: float = 5e-5
    batch_size: int = 32
    max_length: int = 128
    max_steps: int | None = None
    warmup: float = 0.1  # fraction of steps with a linear learning-rate warmup
    weight_decay: float = 0.01
    dropout: bool = False  # dropout during fine-tuning (off: measured better for MiniLM distillation)
    train_embeddings: bool = False  # token embeddings (tied to the LM head in decoders) stay frozen
    # encoders: distil mean-pooled embeddings (cosine | mse), plus hidden_weight x per-layer hidden-state MSE
    distill_objective: str = "cosine"
    hidden_weight: float = 0.0
    # decoders: KL on logits at this temperature, plus lm_weight x LM loss
    temperature: float = 2.0
    lm_weight: float = 0.5
    skip_tokens: int = 0  # decoders: skip the first N corpus tokens (e.g. the region perplexity is scored on)
    # encoders: batches of similar-length texts (shuffled pools sorted by length), so far less padding is
    # computed; STS-B train sentences padded per random batch of 32 cost 2.47x their real tokens
    length_buckets: bool = False
    # decoders: tokens sampled from the dense teacher (cached, seeded; edgeprune/compress/teacher_data.py) used
    # as distillation data: the only data with data "teacher", else mixed into the corpus blocks
    teacher_tokens: int = 0
    teacher_temperature: float = 1.0
    # LoRA (rank > 0): train low-rank updates of every block matrix instead of the full weights, merged into
    # the weights after training (the artifact has the plain pruned shapes)
    lora_rank: int = 0
    lora_alpha: float = 16.0

    def __post_init__(self):
        if self.epochs <= 0 or self.learning_rate <= 0 or self.batch_size < 1 or self.max_length < 2:
            raise EdgePruneError("fine-tuning epochs, lr, batch size and max_length must be positive")
        if self.max_steps is not None and self.max_steps < 1:
            raise EdgePruneError(f"--max-steps must be >= 1 (got {self.max_steps})")
        if self.distill_objective not in ("cosine", "mse"):
            raise EdgePruneError(f"distill_objective must be cosine or mse (got {self.distill_objective!r})")
        if not 0 <= self.warmup < 1 or self.temperature <= 0 or self.skip_tokens < 0:
            raise EdgePruneError("fine-tuning warmup must be in [0, 1), temperature > 0, skip_tokens >= 0")
        if self.teacher_tokens < 0 or self.teacher_temperature <= 0 or self.lora_rank < 0 or self.lora_alpha <= 0:
            raise EdgePruneError(f"--teacher-tokens and --lora-rank must be >= 0, teacher temperature and LoRA "
                                 f"alpha > 0 (got {self.teacher_tokens}, {self.lora_rank}, "
                                 f"{self.teacher_temperature}, {self.lora_alpha})")
        if self.data == "teacher" and not self.teacher_tokens:
            raise EdgePruneError("--finetune teacher needs --teacher-tokens N (how many tokens to sample from the "
                                 "dense model)")

    @property
    def enabled(self) -> bool:
        return self.data is not None


@dataclass(frozen=True)
class CompressConfig(FrozenConfig):
    """A compression recipe. Saved as ``recipe.yaml`` beside the output."""

    structured: StructuredConfig = field(default_factory=StructuredConfig)
    depth: DepthConfig = field(default_factory=DepthConfig)  # blocks / sublayers removed (depth.py)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    reconstruct: ReconstructConfig = field(default_factory=ReconstructConfig)
    sparsity: SparsityConfig = field(default_factory=SparsityConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    task: str = "auto"
    seed: int = 0


def needs_calibration(config: CompressConfig) -> bool:
    """Calibration batches are loaded only for data-aware importance or reconstruction."""
    from edgeprune.compress.importance import NEEDS_CALIBRATION

    structured = config.structured.active and config.structured.importance in NEEDS_CALIBRATION
    return structured or (config.reconstruct.enabled and config.structured.active) or config.depth.needs_calibration


def structured_prune(loaded, cfg: StructuredConfig, calib=None, depth_plan=None):
    """Score units, allocate, cut. Returns the plan that was applied. ``depth_plan``: the depth pruning of the
    same call, which a runtime-priced search (``cfg.cost_model``) includes in its speed prediction."""
    from edgeprune.compress.importance import get_importance
    import functools
    import inspect

    from edgeprune.compress.plan import (ALLOCATIONS_NEEDING_INTERACTIONS, budget_for_fractions, effective_allocation,
                                         get_allocation, rearrange_plan)
    from edgeprune.compress.surgery import apply_plan

    model, adapter = loaded.model, loaded.adapter
    shapes = adapter.shapes(model.config)
    halved = [i for i, s in enumerate(shapes) if not s.heads or not s.ffn]
    if halved:
        raise EdgePruneError(f"width pruning: block(s) {','.join(map(str, halved))} of this model have no attention or "
                             "no FFN (depth-pruned); prune width and depth in one compress call from the source model")
    budget_from_fractions = (cfg.flops_budget is None and cfg.allocation in ALLOCATIONS_NEEDING_INTERACTIONS
                             and (cfg.heads > 0 or cfg.ffn > 0))
    if budget_from_fractions:  # joint searches under a budget: --heads/--ffn say how much to keep
        cfg = cfg.replace(flops_budget=budget_for_fractions(shapes, cfg, adapter, model.config))
    importance = get_importance(cfg.importance)
    # a FLOPs budget is a global constraint: the per-layer "uniform" allocator cannot honour it
    allocation = effective_allocation(cfg)
    if cfg.rearrange or allocation in ALLOCATIONS_NEEDING_INTERACTIONS:
        if "interactions" not in inspect.signature(importance).parameters:
            what = "--rearrange" if cfg.rearrange else f"allocation {allocation!r}"
            raise EdgePruneError(f"{what} needs unit interactions, which importance {cfg.importance!r} "
                                 "does not provide; use --importance fisher")
        importance = functools.partial(importance, interactions=True)
    scores = importance(model, adapter, calib)
    allocate = get_allocation(allocation)
    if cfg.cost_model is not None:
        plan = allocate(scores, shapes, cfg, adapter, model.config, depth_plan=depth_plan)
    else:
        plan = allocate(scores, shapes, cfg, adapter, model.config)
    if cfg.rearrange:
        plan = rearrange_plan(plan, scores, cfg)
    plan.meta.update({"importance": cfg.importance, "allocation": allocation, "gqa_mode": cfg.gqa_mode})
    if budget_from_fractions:
        plan.meta["flops_budget_from_fractions"] = cfg.flops_budget
    apply_plan(model, adapter, plan)
    return plan


def sparsify_and_finetune(loaded, config: CompressConfig, teacher=None) -> tuple[dict, list[dict]]:
    """Sparsity (optionally iterative, with fine-tuning between steps), then recovery fine-tuning with the
    masks held. ``teacher``: the dense model as loaded, for distillation. Returns manifest info and the
    training log."""
    from edgeprune.compress.finetune import finetune
    from edgeprune.compress.sparsity import sparsify

    sp, ft, info, log = config.sparsity, config.finetune, {}, []
    masks = None
    if sp.active and sp.finetune_each_step and not ft.enabled:
        raise EdgePruneError("--finetune-each-step needs fine-tuning data (--finetune DATA)")
    if sp.active:
        segments = []

        def segment(mask_set, movement):  # one fine-tuning segment between pruning steps
            seg_cfg = ft.replace(epochs=ft.epochs / sp.steps,
                                 max_steps=max(1, ft.max_steps // sp.steps) if ft.max_steps else None)
            summary, seg_log = finetune(loaded, seg_cfg, teacher if ft.distill else None, mask_set, movement,
                                        seed=config.seed + len(segments) + 1)
            log.extend(dict(r, segment=len(segments) + 1) for r in seg_log)
            segments.append(summary)

        masks, info["sparsity"] = sparsify(loaded, sp, segment if ft.enabled else None)
        if segments:
            info["sparsity"]["finetune_segments"] = segments
    if ft.enabled:
        summary, final_log = finetune(loaded, ft, teacher if ft.distill else None, masks, seed=config.seed)
        log.extend(dict(r, segment=0) for r in final_log)
        info["finetune"] = summary
        if masks is not None:  # non-zeros after training: the masks held
            info["sparsity"]["nonzero_after_finetune"] = masks.stats()["nonzero"]
    return info, log


def check_options(config: CompressConfig) -> None:
    """Combinations that would silently do nothing (and be recorded as done) are refused before work."""
    ft, sp = config.finetune, config.sparsity
    if ft.distill and not ft.enabled:
        raise EdgePruneError("--distill needs fine-tuning data: pass --finetune DATA (distillation happens during "
                             "recovery fine-tuning)")
    if ft.teacher_tokens and not ft.distill:
        raise EdgePruneError("teacher-generated data (--teacher-tokens / --finetune teacher) is sampled from the "
                             "dense teacher: add --distill")
    if sp.finetune_each_step and not ft.enabled:
        raise EdgePruneError("--finetune-each-step needs fine-tuning data (--finetune DATA)")
    if config.depth.needs_calibration and config.calibration.path is None:
        raise EdgePruneError("--layers/--attn-layers/--ffn-layers choose blocks by calibration data: pass --calib DATA "
                             "(e.g. --calib wikitext2:valid), or name them with --drop-layers/--drop-attn/--drop-ffn")
    if config.structured.cost_model is not None:
        from edgeprune.compress.cost_model import load_cost_model

        load_cost_model(config.structured.cost_model)  # a missing or foreign cost model fails (or warns) now
    if config.reconstruct.enabled and not config.structured.active:
        raise EdgePruneError("--reconstruct re-fits layers after structured pruning: give --heads, --ffn or "
                             "--flops-budget too")


def compress(model: str | Path, out: str | Path, config: CompressConfig | None = None, overwrite: bool = False,
             allow_pickle: bool = False, sequential: bool | None = None, dtype: str | None = None) -> Path:
    """Compress ``model`` per ``config`` and write the artifact to ``out`` (atomically). ``sequential``:
    block by block with bounded memory (Llama family; None: chosen when the model would not fit in memory)."""
    import torch

    from edgeprune.compress import sequential as seq
    from edgeprune.core.model_artifact import save_artifact
    from edgeprune.core.anatomy import parameter_count
    from edgeprune.core.loading import load_model

    config = config or CompressConfig()
    if config.depth.active and sequential:
        raise EdgePruneError("depth pruning (--layers, --drop-layers, --drop-attn, ...) runs in memory: drop --sequential")
    if sequential is None and config.depth.active:
        sequential = False
    if sequential or (sequential is None and seq.should_run_sequential(model, config)):
        return seq.compress_sequential(model, out, config, overwrite=overwrite, dtype=dtype)
    if dtype is not None:
        raise EdgePruneError("--dtype applies to --sequential (the in-memory path computes in float32)")
    out = Path(out)
    if Path(model).exists() and Path(model).resolve() == out.resolve():
        raise EdgePruneError("the output directory must differ from the model directory")
    check_output_dir(out, overwrite)  # fail before the (slow) model load
    check_options(config)
    if needs_calibration(config):
        from edgeprune.compress.calibration import load_texts

        load_texts(config.calibration.path)  # likewise: a bad --calib fails now, not after loading the model
    if config.finetune.enabled:
        from edgeprune.compress.finetune import check_data

        check_data(config.finetune.data)
    torch.manual_seed(config.seed)
    started = time.perf_counter()
    loaded = load_model(model, task=config.task, allow_pickle=allow_pickle)
    dense_parameters = parameter_count(loaded.model)
    timings = {"load_s": round(time.perf_counter() - started, 3)}
    if config.depth.active:
        from edgeprune.compress.depth import check_depth

        check_depth(config.depth, loaded.adapter, loaded.model.config)  # before calibration and scoring
    # the dense model as loaded is the distillation teacher
    teacher = copy.deepcopy(loaded.model) if config.finetune.enabled and config.finetune.distill else None
    plan, calib, calibration_used = None, None, None
    step = time.perf_counter()
    if needs_calibration(config):
        from edgeprune.compress.calibration import load_calibration

        from edgeprune.compress.calibration import calibration_record, warn_if_few

        calib = load_calibration(loaded, config.calibration, seed=config.seed)
        calibration_used = calibration_record(calib, config.calibration)
        warn_if_few(calibration_used["samples_used"], config.calibration.samples, config.calibration.path)
        timings["calibration_s"] = round(time.perf_counter() - step, 3)
    reference = None  # dense model kept for layer-wise reconstruction targets
    if config.reconstruct.enabled and config.structured.active:
        reference = teacher if teacher is not None else copy.deepcopy(loaded.model)
    depth_plan = None
    if config.depth.active:  # scored on the model as loaded, applied after width pruning and reconstruction
        from edgeprune.compress.depth import plan_depth

        step = time.perf_counter()
        depth_plan = plan_depth(loaded.model, loaded.adapter, config.depth, calib, seed=config.seed)
        timings["depth_scoring_s"] = round(time.perf_counter() - step, 3)
    step = time.perf_counter()
    if config.structured.active:
        plan = structured_prune(loaded, config.structured, calib, depth_plan)
        if "flops_budget_from_fractions" in plan.meta:  # the saved recipe reproduces the run
            config = config.replace(structured=config.structured.replace(
                flops_budget=plan.meta["flops_budget_from_fractions"]))
    timings["structured_s"] = round(time.perf_counter() - step, 3)
    recon_extra = {}
    if reference is not None:
        from edgeprune.compress.reconstruct import reconstruct

        step = time.perf_counter()
        rc = config.reconstruct
        recon_extra["reconstruction"] = reconstruct(loaded.model, reference, loaded.adapter, calib, rc.ridge,
                                                    rc.mode, rc.fit_bias)
        timings["reconstruct_s"] = round(time.perf_counter() - step, 3)
        reference = None
    if depth_plan is not None:
        from edgeprune.compress.depth import apply_depth
        from edgeprune.compress.plan import PrunePlan

        if plan is None:
            plan = PrunePlan.identity(loaded.adapter.shapes(loaded.model.config))
        apply_depth(loaded.model, loaded.adapter, depth_plan)
        plan.depth = depth_plan
    extra, train_log = {}, []
    if config.sparsity.active or config.finetune.enabled:
        step = time.perf_counter()
        extra, train_log = sparsify_and_finetune(loaded, config, teacher)
        timings["sparsity_finetune_s"] = round(time.perf_counter() - step, 3)
        teacher = None
    extra.update(recon_extra)
    if depth_plan is not None:
        extra["depth"] = {k: v for k, v in depth_plan.to_dict().items() if k != "meta"}
    if calibration_used:
        extra["calibration"] = calibration_used
    timings["compress_s"] = round(time.perf_counter() - started - timings["load_s"], 3)
    with staged_output(out, overwrite) as tmp:
        if train_log:
            from edgeprune.compress.finetune import write_log

            write_log(tmp, train_log)
        save_artifact(tmp, loaded, config.to_dict(), parent={"model": loaded.source.to_dict()}, plan=plan,
                      dense_parameters=dense_parameters, timings=timings, **extra)
    return out
