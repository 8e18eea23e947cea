"""``edgeprune`` command line. Each stage's sub-commands live beside the stage and are imported lazily,
so ``edgeprune run`` works on a device without torch."""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys

from edgeprune import __version__
from edgeprune.errors import EdgePruneError

# Modules exposing ``register(subparsers)``; each adds its sub-commands with ``set_defaults(func=...)``.
COMMAND_MODULES = (
    "edgeprune.compress.cli",
    "edgeprune.exporters.cli",
    "edgeprune.runtime.cli",
    "edgeprune.eval.cli",
    "edgeprune.bench.cli",
    "edgeprune.catalog_cli",
)


def _models_command(args) -> int:
    from edgeprune import models

    if args.action == "list":
        for alias, description in models.ALIASES.items():
            print(f"{alias:14s} {description}")
        return 0
    path = models.fetch(args.alias)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgeprune",
        description="Prune, export, run and benchmark transformer models for CPU edge deployment.")
    parser.add_argument("--version", action="version", version=f"edgeprune {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    subparsers.required = True
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:  # a stage not installed in this build
                continue
            raise
        module.register(subparsers)
    models = subparsers.add_parser("models", help="list model aliases or fetch one into the cache")
    models.add_argument("action", choices=["list", "fetch"])
    models.add_argument("alias", nargs="?", default="smollm2-135m")
    models.set_defaults(func=_models_command)
    return parser


def print_json_last(result: dict) -> None:
    """Machine-readable result: one JSON object on the last stdout line."""
    sys.stdout.flush()
    print(json.dumps(result, sort_keys=False, default=str))


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except EdgePruneError as exc:
        print(f"edgeprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgeprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still ends in one line unless debugging
        if os.environ.get("EDGEPRUNE_DEBUG"):
            raise
        print(f"edgeprune: error: {exc.__class__.__name__}: {exc} (set EDGEPRUNE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
