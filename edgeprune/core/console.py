"""Console output every stage's CLI shares."""

from __future__ import annotations

import json
import sys


def print_json_last(result: dict) -> None:
    """Machine-readable result: one JSON object on the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False, default=str))
