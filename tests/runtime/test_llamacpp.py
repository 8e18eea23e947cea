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
        forward = worker.time({"batch": 1, "seq": 16, "iterations": 2, "warmup": 1})
        assert len(forward["latencies"]) == 2 and all(t > 0 for t in forward["latencies"])
        decode = worker.decode({"batch": 1, "seq": 16, "new_tokens": 4, "iterations": 2, "warmup": 1})
        assert len(decode["prefill_latencies"]) == 2 and [len(s) for s in decode["step_latencies"]] == [4, 4]
    finally:
        worker.session.close()
