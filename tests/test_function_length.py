"""No function over 80 lines in the exporters, the plan allocators and the bench harness (issue 14): a long
function there is where the next runtime or allocator would have to branch inline."""

import ast
from pathlib import Path

import edgeprune

PACKAGE = Path(edgeprune.__file__).parent
CHECKED = ("exporters", "compress/plan", "bench")
MAX_LINES = 80


def long_functions(root: Path = PACKAGE, folders=CHECKED, limit: int = MAX_LINES) -> list[str]:
    found = []
    for folder in folders:
        for path in sorted((root / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    lines = node.end_lineno - node.lineno + 1  # the def line to the last line of the body
                    if lines > limit:
                        found.append(f"{path.relative_to(root)}:{node.lineno} {node.name} ({lines} lines)")
    return found


def test_no_function_over_80_lines():
    assert not long_functions(), long_functions()


def test_the_check_sees_a_long_function(tmp_path):
    (tmp_path / "bench").mkdir()
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES))
    (tmp_path / "bench" / "m.py").write_text(f"def short():\n    return 1\n\n\ndef long():\n{body}\n")
    assert long_functions(tmp_path, ("bench",)) == [f"bench/m.py:5 long ({MAX_LINES + 1} lines)"]
