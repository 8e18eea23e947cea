"""Where edgeprune finds shared evaluation data and keeps its user cache. Torch-free."""

from __future__ import annotations

import os
from pathlib import Path



def cache_dir() -> Path:
    root = os.environ.get("EDGEPRUNE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "edgeprune"
    )
    return Path(root)


def data_dir() -> Path:
    """The evaluation data folder: $EDGEPRUNE_DATA, else ``shared/data`` beside the checkout or the cwd."""
    env = os.environ.get("EDGEPRUNE_DATA")
    if env:
        return Path(env)
    candidates = [Path(__file__).resolve().parents[3] / "shared" / "data", Path.cwd().parent / "shared" / "data",
                  Path.cwd() / "shared" / "data"]
    for candidate in candidates:
        if candidate.is_dir():
            return candidate
    return candidates[0]

