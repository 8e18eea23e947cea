"""The runtime tests' exported tiny models, shared with the zero-shot tests (torch vs onnxruntime)."""

import importlib.util
from pathlib import Path

_spec = importlib.util.spec_from_file_location("runtime_conftest", Path(__file__).parents[1] / "runtime" / "conftest.py")
_runtime_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_runtime_conftest)

exported = _runtime_conftest.exported
