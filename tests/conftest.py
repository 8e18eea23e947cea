import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import FAMILIES, make_tiny  # noqa: E402


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """Factory: tiny_models(family) -> path of a saved tiny random model (built once per session)."""
    cache = {}

    def get(family: str, task: str | None = None) -> Path:
        key = (family, task)
        if key not in cache:
            cache[key] = make_tiny(family, tmp_path_factory.mktemp(f"tiny-{family}-{task or 'base'}"), task=task)
        return cache[key]

    return get


@pytest.fixture(params=FAMILIES)
def family(request):
    return request.param


def pytest_report_header(config):
    return "edgeprune tests: tiny random models; real-model tests are marked slow (pytest -m slow)"


def runtime_or_skip(name: str, what: str):
    """The named runtime, or a skip naming its install command."""
    from edgeprune.runtime.base import get_runtime

    runtime = get_runtime(name, require_available=False)
    if not runtime.available():
        pytest.skip(f"{what} missing: {runtime.why_unavailable()}")
    return runtime


@pytest.fixture(scope="session")
def llamacpp_runtime():
    return runtime_or_skip("llamacpp", "llama.cpp runtime")


@pytest.fixture(scope="session")
def deepsparse_runtime():
    return runtime_or_skip("deepsparse", "DeepSparse env")
