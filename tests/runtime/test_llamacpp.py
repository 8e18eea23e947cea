"""The llamacpp runtime: install failures, file checks, and (marked llamacpp) generation, context overflow,
logits and the bench decode loop on tiny random GGUF files written by edgeprune.runtime.llamacpp_tiny."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from edgeprune.cli import main
from edgeprune.core.errors import EdgePruneError
from edgeprune.runtime.llamacpp_adapter import gguf_file
from edgeprune.runtime.llamacpp_tiny import Shape, write_random_llama


def test_not_gguf_and_missing_files_are_clear(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf")
    with pytest.raises(EdgePruneError, match=r"model.gguf: not a GGUF file \(starts with b'PK"):
        gguf_file(fake)
    with pytest.raises(EdgePruneError, match="GGUF file not found"):
        gguf_file(tmp_path / "absent.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(EdgePruneError, match="no GGUF file here"):
        gguf_file(tmp_path / "empty")


def test_missing_runtime_names_the_install_command(tmp_path):
    # a fresh interpreter where llama_cpp is not importable: the runtime says how to install it
    code = ("from edgeprune.runtime.base import get_runtime; r = get_runtime('llamacpp', require_available=False); "
            "print(r.available()); print(r.why_unavailable())")
    env = {"EDGEPRUNE_LLAMACPP_SITE": str(tmp_path / "nowhere"), "PYTHONPATH": str(Path(__file__).parents[2]),
           "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    lines = result.stdout.strip().splitlines()
    if lines and lines[0] == "True":
        pytest.skip("llama_cpp is installed in this environment itself")
    assert lines[0] == "False" and "edgeprune runtime install llamacpp" in lines[1]


def test_failing_build_names_its_log_and_installs_nothing(tmp_path, monkeypatch):
    from edgeprune.runtime import llamacpp_install

    if not (llamacpp_install.shutil.which("cmake") and llamacpp_install.shutil.which("c++")):
        pytest.skip("needs cmake and a C++ compiler")
    monkeypatch.setenv("EDGEPRUNE_CACHE", str(tmp_path / "cache"))
    # an sdist whose vendored llama.cpp does not configure
    src = tmp_path / f"llama_cpp_python-{llamacpp_install.VERSION}"
    (src / "vendor" / "llama.cpp").mkdir(parents=True)
    (src / "vendor" / "llama.cpp" / "CMakeLists.txt").write_text("cmake_minimum_required(VERSION 3.14)\n"
                                                                  "project(broken)\nmessage(FATAL_ERROR \"nope\")\n")
    sdist = tmp_path / "cache" / "llamacpp" / "sdist" / f"llama_cpp_python-{llamacpp_install.VERSION}.tar.gz"
    sdist.parent.mkdir(parents=True)
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(src, arcname=src.name)
    with pytest.raises(EdgePruneError, match=r"cmake configure failed \(exit 1\); see the log .*build-native\.log"):
        llamacpp_install.install(progress=False, jobs=1)
    assert not llamacpp_install.install_dir().exists()
    assert "nope" in (tmp_path / "cache" / "llamacpp" / "build-native.log").read_text()


def test_tool_check_reports_missing_shared_libraries(tmp_path):
    from edgeprune.runtime.llamacpp_install import _tool_starts

    fine, broken = tmp_path / "fine", tmp_path / "broken"
    fine.write_text("#!/bin/sh\necho usage\n")
    # what the dynamic loader prints when a tool was copied without its lib<tool>-impl.so
    broken.write_text("#!/bin/sh\necho 'llama-bench: error while loading shared libraries: libllama-bench-impl.so: "
                      "cannot open shared object file' >&2\nexit 127\n")
    for tool in (fine, broken):
        tool.chmod(0o755)
    assert _tool_starts(fine) == ""
    assert "libllama-bench-impl.so" in _tool_starts(broken)


def test_portable_flags_follow_the_cpu_and_turn_amx_off(monkeypatch):
    from edgeprune.runtime import llamacpp_install

    monkeypatch.setattr(llamacpp_install, "cpu_flags", lambda: {"avx", "avx2", "fma", "f16c", "avx512f", "amx_int8"})
    flags = llamacpp_install.cmake_flags("portable")
    assert "-DGGML_NATIVE=OFF" in flags and "-DGGML_AVX2=ON" in flags and "-DGGML_AVX512=ON" in flags
    assert "-DGGML_AVX512_VNNI=OFF" in flags and "-DGGML_AMX_INT8=OFF" in flags and "-DGGML_AMX_TILE=OFF" in flags
    assert "-DGGML_NATIVE=ON" in llamacpp_install.cmake_flags("native")


# --- through llama.cpp ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tiny-gguf")
    return {"even": write_random_llama(directory / "even.gguf", "q8_0", context=48),
            "uneven": write_random_llama(directory / "uneven.gguf", "q4_0",
                                         shapes=[Shape(4, 2, 128), Shape(2, 1, 96)], context=48)}


@pytest.mark.llamacpp
@pytest.mark.parametrize("which", ["even", "uneven"])
def test_generation_logits_and_decode_loop(tiny_gguf, llamacpp_runtime, which):
    session = llamacpp_runtime.load(str(tiny_gguf[which]), threads=1)
    try:
        assert session.n_ctx == 48 and session.vocab_size == 259
        ids = session.encode("the cat sat")
        full = session.logits(np.asarray([ids]))
        assert full.shape == (1, len(ids), 259) and np.isfinite(full).all()
        # KV-cache steps give the same next-token logits as a full recompute
        session.reset()
        session.feed(ids[:-1])
        step = session.feed(ids[-1:])
        np.testing.assert_allclose(step, full[0, -1], atol=1e-3)
        greedy = session.generate_ids(ids, 5, stop_on_eos=False)
        assert len(greedy) == 5 and greedy[0] == int(full[0, -1].argmax())
        prefill, steps, _ = session.decode_timings(np.asarray([ids]), 4)
        assert prefill > 0 and len(steps) == 4 and all(t > 0 for t in steps)
    finally:
        session.close()


@pytest.mark.llamacpp
def test_run_cli_and_context_overflow(tiny_gguf, llamacpp_runtime, capsys):
    assert main(["run", str(tiny_gguf["even"]), "--runtime", "llamacpp", "--text", "hi", "--max-new-tokens", "4",
                 "--threads", "1", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["task"] == "StatefulGenerationPipeline" and isinstance(summary["results"][0], str)
    # 48 positions: a 3-token prompt + 100 new tokens overflows; what was generated is printed, then one error line
    assert main(["run", str(tiny_gguf["even"]), "--runtime", "llamacpp", "--text", "abc", "--max-new-tokens", "100",
                 "--threads", "1"]) == 2
    captured = capsys.readouterr()
    assert captured.out.strip() != ""
    error = [line for line in captured.err.splitlines() if line.startswith("edgeprune: error:")]
    assert len(error) == 1 and "context overflow after" in error[0] and "48 tokens" in error[0]


@pytest.mark.llamacpp
def test_rejected_gguf_is_one_clear_line(tiny_gguf, llamacpp_runtime, tmp_path):
    broken = tmp_path / "truncated.gguf"
    broken.write_bytes(tiny_gguf["even"].read_bytes()[:4096])  # a real header, the tensor data cut off
    with pytest.raises(EdgePruneError, match="llama.cpp rejects .*truncated.gguf"):
        llamacpp_runtime.load(str(broken))


@pytest.mark.llamacpp
def test_bench_worker_times_prefill_and_kv_decode(tiny_gguf, llamacpp_runtime):
    from edgeprune.bench.worker import Worker

    worker = Worker()
    info = worker.load({"model": str(tiny_gguf["uneven"]), "runtime": "llamacpp", "threads": 1})
    try:
        assert info["decoder"] and info["build"] is not None
        # the context settings decode speed depends on are in every report (flash attention as llama.cpp's tools)
        session = worker.session
        assert info["build"]["context"] == {"n_ctx": session.n_ctx, "n_batch": session.llm.n_batch, "threads": 1,
                                            "flash_attn": True}
        forward = worker.time({"batch": 1, "seq": 16, "iterations": 2, "warmup": 1})
        assert len(forward["latencies"]) == 2 and all(t > 0 for t in forward["latencies"])
        decode = worker.decode({"batch": 1, "seq": 16, "new_tokens": 4, "iterations": 2, "warmup": 1})
        assert len(decode["prefill_latencies"]) == 2 and [len(s) for s in decode["step_latencies"]] == [4, 4]
    finally:
        worker.session.close()


@pytest.mark.llamacpp
def test_target_logits_equal_full_logits(tiny_gguf, llamacpp_runtime):
    """The zero-shot scorer's fast path: the output head at the scored positions only, same numbers."""
    from edgeprune.runtime.llamacpp_adapter import LlamaCppBackend

    backend = LlamaCppBackend(tiny_gguf["even"], threads=1)
    try:
        rng = np.random.default_rng(0)
        lengths = [11, 6, 1]
        ids = np.zeros((3, 11), dtype=np.int64)
        mask = np.zeros_like(ids)
        for row, n in enumerate(lengths):
            ids[row, :n] = rng.integers(3, 259, n)
            mask[row, :n] = 1
        rows = np.array([0, 0, 1, 2, 1, 0])
        positions = np.array([10, 3, 5, 0, 4, 9])
        full = backend.batch_logits(ids, mask)[rows, positions]
        fast = backend.target_logits(ids, mask, rows, positions)
        np.testing.assert_allclose(fast, full, rtol=1e-4, atol=1e-4)
    finally:
        backend.session.close()


FAKE_LLAMA = {
    "crashes": "import os, signal\nclass Llama:\n    def __init__(self, **kw):\n        os.kill(os.getpid(), signal.SIGSEGV)\n",
    "works": ("class Llama:\n    def __init__(self, **kw): pass\n    def tokenize(self, text, add_bos=True): return [1, 2]\n"
              "    def generate(self, ids, **kw):\n        yield from range(3, 20)\n"
              "    def detokenize(self, ids): return b'text'\n"),
}


@pytest.mark.parametrize("behaviour", ["crashes", "works"])
def test_a_llama_cpp_from_elsewhere_is_self_tested_before_use(tmp_path, behaviour):
    # another package's llama-cpp-python (a native build that segfaults on AMX CPUs) must not take the caller down
    package = tmp_path / "elsewhere" / "llama_cpp"
    (package / "lib").mkdir(parents=True)
    (package / "__init__.py").write_text(FAKE_LLAMA[behaviour])
    (package / "lib" / "libggml-cpu.so").write_bytes(b"\0")
    code = ("from edgeprune.runtime.base import get_runtime; r = get_runtime('llamacpp', require_available=False); "
            "print(repr(r.why_unavailable()))")
    env = {"EDGEPRUNE_LLAMACPP_SITE": str(tmp_path / "nowhere"), "EDGEPRUNE_CACHE": str(tmp_path / "cache"),
           "PYTHONPATH": f"{package.parent}:{Path(__file__).parents[2]}", "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    for attempt in range(2):  # the second call reads the cached verdict
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        reason = eval(result.stdout.strip().splitlines()[-1])
        if behaviour == "works":
            assert reason == ""
        else:
            assert f"the llama_cpp installed in this environment ({package}) fails its self-test" in reason
            assert "signal 11" in reason and "edgeprune runtime install llamacpp" in reason
        verdicts = list((tmp_path / "cache" / "llamacpp" / "existing-installs").glob("*.json"))
        assert len(verdicts) == 1 and json.loads(verdicts[0].read_text())["ok"] == (behaviour == "works")


def test_a_crashing_build_is_reported_by_its_signal_not_its_last_log_line(tmp_path):
    """The installer's self-test names the signal a crashing build died of; llama.cpp's last log line before
    the crash (often a harmless warning) is kept apart, so the fallback message does not blame it."""
    from edgeprune.runtime.llamacpp_install import self_test

    package = tmp_path / "site" / "llama_cpp"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(
        "import os, signal, sys\nclass Llama:\n    def __init__(self, **kw):\n"
        "        print('llama_context: a harmless warning', file=sys.stderr, flush=True)\n"
        "        os.kill(os.getpid(), signal.SIGSEGV)\n")
    result = self_test(tmp_path / "site", tmp_path / "model.gguf", timeout=120)
    assert not result["ok"] and result["signal"] == 11
    assert result["reason"] == "killed by SIGSEGV" and "harmless warning" in result["stderr_tail"]
