"""Importing the package and its runtime must not pull in torch or transformers (edge devices lack them)."""

import subprocess
import sys

BLOCK = """
import sys
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in ('torch', 'transformers', 'optimum', 'datasets'):
            raise ImportError('blocked for the lean-import test: ' + name)
sys.meta_path.insert(0, Block())
"""


def run_blocked(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", BLOCK + code], capture_output=True, text=True, timeout=120)


def test_package_and_runtime_import_without_torch():
    result = run_blocked("import edgeprune, edgeprune.runtime, edgeprune.runtime.base, edgeprune.core.artifacts, "
                         "edgeprune.eval.metrics, edgeprune.eval.backends, edgeprune.bench.worker, edgeprune.cli\n"
                         "print('ok')")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_cli_parser_builds_without_torch():
    result = run_blocked("from edgeprune.cli import build_parser\nbuild_parser()\nprint('ok')")
    assert result.returncode == 0, result.stderr
