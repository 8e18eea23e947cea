"""Save a compressed model as an artifact directory and load it back with its exact per-layer shapes."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

import torch

from edgeprune.core.artifacts import check_integrity, read_manifest, write_manifest
from edgeprune.core.errors import EdgePruneError
from edgeprune.core.loading import TASK_CLASSES, LoadedModel, ModelSource, prepare_tokenizer, task_for

PLAN_FILE = "plan.json"
RECIPE_FILE = "recipe.yaml"


def save_artifact(directory: Path, loaded: LoadedModel, recipe: dict[str, Any], parent: dict | None,
                  plan=None, **extra: Any) -> dict:
    """Write weights (safetensors), config with per-layer shapes, tokenizer, plan, recipe and manifest."""
    import yaml

    from edgeprune.core.anatomy import parameter_count, record_shapes

    directory = Path(directory)
    model = loaded.model
    record_shapes(model, loaded.adapter.shapes(model.config))
    model.save_pretrained(directory, safe_serialization=True)
    loaded.tokenizer.save_pretrained(directory)
    if plan is not None:
        plan.save(directory / PLAN_FILE)
    (directory / RECIPE_FILE).write_text(yaml.safe_dump(recipe, sort_keys=False))
    return write_manifest(
        directory, "compress", recipe, parent,
        task=loaded.task, auto_class=TASK_CLASSES[loaded.task], model_type=model.config.model_type,
        parameters=parameter_count(model), layer_shapes=[s.to_dict() for s in loaded.adapter.shapes(model.config)],
        **extra,
    )


def _no_init():
    try:
        from transformers.modeling_utils import no_init_weights

        return no_init_weights()
    except ImportError:  # pragma: no cover - older/newer transformers
        return contextlib.nullcontext()


def _read_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise EdgePruneError(f"{directory}: no safetensors weights in artifact")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        try:
            state.update(load_file(str(file)))
        except Exception as exc:  # safetensors raises its own SafetensorError (and OSError) for a damaged file
            raise EdgePruneError(f"{file}: cannot read the weights ({str(exc).splitlines()[0] if str(exc) else exc.__class__.__name__}); "
                                 "the file is damaged: re-create the artifact") from None
    return state


def compressed_manifest(directory: Path) -> dict:
    """The manifest of a compressed-model artifact whose files match their recorded hashes (else one line)."""
    manifest = read_manifest(directory)
    if manifest.get("stage") != "compress":
        raise EdgePruneError(f"{directory}: a {manifest.get('stage')!r} artifact, not a compressed model")
    check_integrity(directory, manifest)
    return manifest


def load_artifact(path: str | Path, task: str | None = None) -> LoadedModel:
    """Rebuild a compressed model: dense skeleton -> stored shapes -> load weights strictly."""
    import transformers

    from edgeprune.core.arch import get_adapter

    directory = Path(path)
    manifest = compressed_manifest(directory)
    config = transformers.AutoConfig.from_pretrained(directory, trust_remote_code=False)
    adapter = get_adapter(config)
    task = task_for(adapter, task or manifest.get("task"))
    if task != manifest.get("task") and task != "feature-extraction":
        # Only the backbone is shared between heads: any other head would be random weights.
        raise EdgePruneError(f"{directory}: a {manifest.get('task')} artifact has no trained {task} head; use "
                             f"--task {manifest.get('task')} (or feature-extraction), or compress a model that has one")
    model_cls = getattr(transformers, TASK_CLASSES[task])
    with _no_init():
        model = model_cls.from_config(config, dtype=torch.float32)
    adapter.resize_to(model, adapter.shapes(config))
    state = _read_state_dict(directory)
    if task != manifest.get("task"):
        # A different head than was saved: load only the shared backbone.
        prefix = model.base_model_prefix + "."
        state = {k if k.startswith(prefix) else prefix + k: v for k, v in state.items()}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # size mismatch: config.json's widths and the weights disagree
        raise EdgePruneError(f"{directory}: config.json does not match the weights "
                             f"({str(exc).splitlines()[-1].strip()}); re-create the artifact") from None
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    missing = [k for k in missing if k not in tied and not k.endswith("position_ids")]
    if task == manifest.get("task") and (missing or unexpected):
        raise EdgePruneError(f"{directory}: weights do not match the stored shapes "
                             f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    model.eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory)
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, ModelSource("artifact", str(directory.resolve())), adapter, task)


def load(path: str | Path, task: str | None = None) -> LoadedModel:
    """Public API ``edgeprune.load(OUT)``: the rebuilt model with ``.model``, ``.tokenizer``, ``.adapter``."""
    return load_artifact(path, task=task)
