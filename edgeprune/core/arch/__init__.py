"""Architecture adapters, registered by ``model_type``. The only code that knows module names."""

from __future__ import annotations

from edgeprune.core.arch.base import ArchAdapter, LayerPlan, LayerShape, ParamSlice
from edgeprune.core.errors import EdgePruneError

_REGISTRY: dict[str, ArchAdapter] = {}


def register(adapter_cls: type[ArchAdapter]) -> type[ArchAdapter]:
    instance = adapter_cls()
    for model_type in adapter_cls.model_types:
        _REGISTRY[model_type] = instance
    return adapter_cls


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_adapter(config_or_model_type) -> ArchAdapter:
    model_type = config_or_model_type if isinstance(config_or_model_type, str) else getattr(
        config_or_model_type, "model_type", None)
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise EdgePruneError(
            f"unsupported architecture {model_type!r}; supported model types: {', '.join(supported_model_types())}"
        ) from None


# Importing the family modules registers them.
from edgeprune.core.arch import bert, distilbert, gpt2, llama  # noqa: E402,F401

__all__ = ["ArchAdapter", "LayerPlan", "LayerShape", "ParamSlice", "get_adapter", "register", "supported_model_types"]
