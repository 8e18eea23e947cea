"""Built-in compress recipes (``edgeprune/recipes/*.yaml``, shipped as package data), addressable by name:
``--recipe minilm-50-distill``. Torch-free.

Each recipe file starts with comment lines describing it; the line starting ``# measured:`` states the
result the project measured with it (``edgeprune recipes list`` prints it)."""

from __future__ import annotations

from pathlib import Path

from edgeprune.core.errors import EdgePruneError

RECIPES_DIR = Path(__file__).resolve().parents[1] / "recipes"
MEASURED_PREFIX = "# measured:"


def builtin_names() -> list[str]:
    return sorted(p.stem for p in RECIPES_DIR.glob("*.yaml"))


def resolve_recipe(ref: str, relative_to: Path | None = None) -> str:
    """A recipe file as given, relative to ``relative_to`` (e.g. the pipeline file's folder), or a built-in
    recipe by name (with or without ``.yaml``)."""
    for candidate in (Path(ref).expanduser(), (relative_to or Path.cwd()) / ref, RECIPES_DIR / ref,
                      RECIPES_DIR / f"{ref}.yaml"):
        if candidate.is_file():
            return str(candidate)
    raise EdgePruneError(f"recipe not found: {ref} (not a file; built-in recipes: {', '.join(builtin_names())}; "
                         "`edgeprune recipes list` describes them)")


def describe(path: Path) -> dict[str, str]:
    """Name, one-line summary (the first comment line) and measured result of a recipe file."""
    comments = [line.rstrip() for line in path.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
    measured = next((c[len(MEASURED_PREFIX):].strip() for c in comments if c.startswith(MEASURED_PREFIX)), "")
    summary = ""
    for comment in comments:  # the first sentence of the header
        summary = f"{summary} {comment.lstrip('#').strip()}".strip()
        if summary.endswith(".") or comment.startswith(MEASURED_PREFIX):
            break
    return {"name": path.stem, "path": str(path), "summary": summary, "measured": measured or "not measured"}


def list_recipes() -> list[dict[str, str]]:
    return [describe(RECIPES_DIR / f"{name}.yaml") for name in builtin_names()]
