"""``edgeprune`` command line. Each stage's sub-commands live beside the stage and are imported lazily,
so ``edgeprune run`` works on a device without torch."""

from __future__ import annotations

import argparse
import importlib
import contextlib
import os
import signal
import sys
import threading

from edgeprune import __version__
from edgeprune.core.console import print_json_last
from edgeprune.core.errors import EdgePruneError

# Modules exposing ``register(subparsers)``; each adds its sub-commands with ``set_defaults(func=...)``.
COMMAND_MODULES = (
    "edgeprune.compress.cli",
    "edgeprune.exporters.cli",
    "edgeprune.runtime.cli",
    "edgeprune.eval.cli",
    "edgeprune.bench.cli",
    "edgeprune.pipeline_cli",
    "edgeprune.bench.fleet",
    "edgeprune.catalog_cli",
)


def _models_command(args) -> int:
    from edgeprune.core import loading as models

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
    verify = subparsers.add_parser("verify", help="check an edgeprune output's files against its manifest's SHA-256s")
    verify.add_argument("directory", help="artifact, export, bench or pipeline directory")
    verify.add_argument("--json", action="store_true")
    verify.set_defaults(func=_verify_command)
    return parser


def _verify_command(args) -> int:
    from edgeprune.core.artifacts import read_manifest, verify_files

    manifest = read_manifest(args.directory)
    problems = verify_files(args.directory, manifest)
    files = manifest.get("files") or {}
    for problem in problems:
        print(f"FAILED {problem}")
    if args.json:
        print_json_last({"directory": str(args.directory), "files": len(files), "ok": not problems,
                         "problems": problems})
    if problems:
        raise EdgePruneError(f"{args.directory}: {len(problems)} of {len(files)} files do not match the manifest")
    print(f"{args.directory}: all {len(files)} files match the manifest")
    return 0


# Packages only the full install has; a runtime-only install (edge device) reaches them only by mistake.
FULL_ONLY = ("torch", "transformers", "optimum", "safetensors", "datasets", "gguf", "accelerate", "scipy")


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C so every ``staged_output`` and temporary directory is cleaned up."""


@contextlib.contextmanager
def _sigterm_raises():
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        with _sigterm_raises():
            return int(args.func(args) or 0)
    except EdgePruneError as exc:
        print(f"edgeprune: error: {exc}", file=sys.stderr)
        return 2
    except Terminated:
        print("edgeprune: terminated; nothing was written", file=sys.stderr)
        return 143
    except KeyboardInterrupt:
        print("edgeprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an unexpected failure still ends in one line unless debugging
        if os.environ.get("EDGEPRUNE_DEBUG"):
            raise
        missing = (getattr(exc, "name", None) or "").split(".")[0] if isinstance(exc, ModuleNotFoundError) else ""
        if missing in FULL_ONLY:
            print(f"edgeprune: error: `edgeprune {args.command}` needs {missing}, which this install lacks (a "
                  "runtime-only install runs and benchmarks exported models); install everything with: "
                  "pip install 'edgeprune[full]'", file=sys.stderr)
            return 2
        print(f"edgeprune: error: {exc.__class__.__name__}: {exc} (set EDGEPRUNE_DEBUG=1 for a traceback)",
              file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
