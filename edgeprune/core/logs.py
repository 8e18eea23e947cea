"""Scoped silencing of third-party loggers: levels are set for one call and restored after it, so a program
that imports edgeprune keeps its own logging configuration."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def quiet_logs(*names: str, level: int = logging.ERROR) -> Iterator[None]:
    """Raise the named loggers (``""``: the root logger) to ``level`` inside the block, then restore them."""
    loggers = [logging.getLogger(name or None) for name in names]
    saved = [(logger, logger.level) for logger in loggers]
    root = logging.getLogger()
    # A bare ``logging.warning(...)`` in a library calls basicConfig() when the root logger has no handler,
    # installing a stderr handler for good; a placeholder handler for the duration prevents that.
    placeholder = logging.NullHandler() if not root.handlers else None
    if placeholder is not None:
        root.addHandler(placeholder)
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, previous in saved:
            logger.setLevel(previous)
        if placeholder is not None:
            root.removeHandler(placeholder)
