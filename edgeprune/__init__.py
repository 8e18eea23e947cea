"""edgeprune: prune, export, run and benchmark transformer models on CPU.

Kept lean on purpose: importing ``edgeprune`` (or ``edgeprune.runtime``) must not pull in torch or
transformers, so heavy entry points are resolved lazily.
"""

__version__ = "0.1.0"

__all__ = ["__version__", "load", "compress"]


def __getattr__(name):
    if name == "load":
        from edgeprune.core.model_artifact import load

        return load
    if name == "compress":
        from edgeprune.compress.api import compress

        return compress
    raise AttributeError(f"module 'edgeprune' has no attribute {name!r}")
