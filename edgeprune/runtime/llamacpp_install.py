"""``edgeprune runtime install llamacpp``: build llama-cpp-python (and llama.cpp's own tools) from its sdist.

The registry has only the source distribution. One CMake build of its vendored llama.cpp
(``vendor/llama.cpp``) makes the shared libraries the Python bindings load *and* the upstream
``llama-bench``, ``llama-perplexity``, ``llama-completion`` and ``llama-quantize`` used as cross-checks, so
both measure the same code. Layout under ``edgeprune.core.paths.cache_dir()/llamacpp``::

    sdist/     the downloaded llama_cpp_python-VERSION.tar.gz (kept: re-installs skip the download)
    src/       the unpacked sdist
    build-native/, build-portable/   CMake build trees (kept: re-installs are incremental)
    install/   site/ (llama_cpp package + its pure-python deps), bin/ (tools + shared libs), build.json
    build-*.log

``install/`` is assembled in a temp dir and renamed into place only after the self-test passed; the tools
are built after that (they need llama.cpp's large ``common`` library), so a slow or failing tools build
never leaves the runtime uninstalled.

The self-test generates a few tokens in a child process, so a crashing build never takes the caller
down. On Intel AMX CPUs a native build of this ggml segfaults in ``ggml_backend_amx_mul_mat`` on the
first matmul; when the native self-test dies, the build is redone with ``GGML_NATIVE=OFF``, the
AVX/AVX2/AVX-512/VNNI options this CPU has switched on and ``GGML_AMX_*`` off.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.paths import cache_dir

VERSION = "0.3.36"
PACKAGE = f"llama-cpp-python=={VERSION}"
PURE_DEPS = ("diskcache>=5.6.1",)  # numpy, jinja2, typing-extensions come with edgeprune itself
TOOLS = ("llama-bench", "llama-perplexity", "llama-completion", "llama-quantize")
COMMON_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
                "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF",
                "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_BUILD_TOOLS=ON", "-DLLAMA_BUILD_COMMON=ON",
                # tools and libraries are copied into one folder: let them find each other there
                "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON", "-DCMAKE_INSTALL_RPATH=$ORIGIN")
# ggml option -> /proc/cpuinfo flag that must be present to switch it on in the portable build
PORTABLE_ISA = {"GGML_AVX": "avx", "GGML_AVX2": "avx2", "GGML_FMA": "fma", "GGML_F16C": "f16c",
                "GGML_AVX_VNNI": "avx_vnni", "GGML_AVX512": "avx512f", "GGML_AVX512_VBMI": "avx512vbmi",
                "GGML_AVX512_VNNI": "avx512_vnni", "GGML_AVX512_BF16": "avx512_bf16"}
INSTALL_HINT = "run `edgeprune runtime install llamacpp` (builds llama-cpp-python from source, about 10 min)"

SELF_TEST = r"""
import json, sys
sys.path.insert(0, sys.argv[1])  # the build under test, never another llama_cpp the environment holds
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[2], n_ctx=64, n_threads=int(sys.argv[3]), verbose=False)
ids = llm.tokenize(b"The capital of France is", add_bos=True)
out = []
for token in llm.generate(ids, top_k=1, top_p=1.0, temp=0.0, reset=True):
    out.append(int(token))
    if len(out) == 8:
        break
print(json.dumps({"generated": out, "text": llm.detokenize(out).decode("utf-8", "replace")}))
"""


def root() -> Path:
    return cache_dir() / "llamacpp"


def install_dir() -> Path:
    return root() / "install"


def cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            for line in handle:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cmake_flags(variant: str) -> list[str]:
    if variant == "native":
        return list(COMMON_FLAGS) + ["-DGGML_NATIVE=ON"]
    flags = cpu_flags()
    isa = [f"-D{option}={'ON' if flag in flags else 'OFF'}" for option, flag in PORTABLE_ISA.items()]
    return list(COMMON_FLAGS) + ["-DGGML_NATIVE=OFF"] + isa + [
        "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF"]


def _run_logged(cmd: list[str], log: Path, what: str, env: dict | None = None, cwd: Path | None = None) -> None:
    with open(log, "a") as handle:
        handle.write(f"\n$ {' '.join(cmd)}\n")
        handle.flush()
        result = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    if result.returncode != 0:
        raise EdgePruneError(f"{what} failed (exit {result.returncode}); see the log {log}")


def _sdist(log: Path, say) -> Path:
    target = root() / "sdist" / f"llama_cpp_python-{VERSION}.tar.gz"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="sdist-", dir=target.parent) as tmp:
        say(f"downloading the {PACKAGE} source distribution")
        _run_logged([sys.executable, "-m", "pip", "download", "--disable-pip-version-check", "--no-binary", ":all:",
                     "--no-deps", "-d", tmp, PACKAGE], log, f"pip download {PACKAGE}")
        found = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if not found:
            raise EdgePruneError(f"pip download produced no llama_cpp_python sdist; see the log {log}")
        os.replace(found[0], target)
    return target


def _source(sdist: Path) -> Path:
    src = root() / "src" / f"llama_cpp_python-{VERSION}"
    if (src / "vendor" / "llama.cpp" / "CMakeLists.txt").is_file():
        return src
    src.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="src-", dir=src.parent) as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        os.replace(Path(tmp) / src.name, src)
    return src


def _build(src: Path, variant: str, jobs: int, say) -> tuple[Path, list[str], Path]:
    build = root() / f"build-{variant}"
    log = root() / f"build-{variant}.log"
    flags = cmake_flags(variant)
    say(f"building llama.cpp ({variant}: {' '.join(f for f in flags if 'GGML' in f)}), log {log}")
    _run_logged(["cmake", "-S", str(src / "vendor" / "llama.cpp"), "-B", str(build)] + flags, log, "cmake configure")
    _run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", "llama"], log, "cmake build")
    return build, flags, log


def _build_tools(build: Path, log: Path, jobs: int, say) -> list[str]:
    """The upstream tools, after the bindings are installed (they need llama.cpp's large common library;
    a failure here leaves a working runtime and is reported, not raised)."""
    say(f"building the upstream tools {', '.join(TOOLS)} (for cross-checks), log {log}")
    try:
        _run_logged(["cmake", "--build", str(build), "-j", str(jobs), "--target", *TOOLS], log, "cmake build (tools)")
    except EdgePruneError as exc:
        say(f"tools not built: {exc}")
    bin_dir = install_dir() / "bin"
    # the tools link llama.cpp's common library and one lib<tool>-impl.so each, built only with them
    for path in (build / "bin").glob("lib*.so*"):
        if not (bin_dir / path.name).exists():
            shutil.copy2(path, bin_dir / path.name, follow_symlinks=False)
    built = []
    for tool in TOOLS:
        if (build / "bin" / tool).is_file():
            shutil.copy2(build / "bin" / tool, bin_dir / tool)
            problem = _tool_starts(bin_dir / tool)
            if problem:
                say(f"{tool} was built but does not start: {problem}")
            else:
                built.append(tool)
    return built


def _tool_starts(tool: Path) -> str:
    """'' if the copied tool finds its shared libraries (``--help`` runs), else the loader's message."""
    try:
        done = subprocess.run([str(tool), "--help"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return str(exc)
    missing = [line for line in done.stderr.splitlines() if "error while loading shared libraries" in line]
    return missing[0].strip() if missing else ""


def _assemble(staging: Path, src: Path, build: Path, log: Path) -> None:
    site, bin_dir = staging / "site", staging / "bin"
    shutil.copytree(src / "llama_cpp", site / "llama_cpp", ignore=shutil.ignore_patterns("server", "__pycache__"))
    lib = site / "llama_cpp" / "lib"
    lib.mkdir(exist_ok=True)
    bin_dir.mkdir()
    libraries = [p for p in (build / "bin").glob("*.so*")] + [p for p in build.rglob("lib*.so*") if p.is_file()]
    if not any(p.name.startswith("libllama.so") for p in libraries):
        raise EdgePruneError(f"the build produced no libllama.so; see the log {log}")
    for path in libraries:
        shutil.copy2(path, lib / path.name)
        shutil.copy2(path, bin_dir / path.name)
    _run_logged([sys.executable, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--quiet",
                 "--target", str(site), *PURE_DEPS], log, f"pip install {' '.join(PURE_DEPS)}")


def self_test_model(directory: Path) -> Path:
    """The model the self-test generates with: the smollm2-135m alias (Q4_1, where the AMX crash was seen)
    when fetched, else a tiny random Llama written as Q4_0 (exercises the repacked Q4_0 kernels)."""
    from edgeprune.core.loading import smollm2_path

    if smollm2_path().is_file():
        return smollm2_path()
    from edgeprune.runtime.llamacpp_tiny import write_random_llama

    return write_random_llama(directory / "selftest.gguf", qtype="q4_0")


def self_test(site: Path, model: Path, threads: int = 2, timeout: int = 300) -> dict:
    """Generate 8 tokens in a child process; returns {"ok", ...} (a crash is a result, not an exception)."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    try:
        result = subprocess.run([sys.executable, "-c", SELF_TEST, str(site), str(model), str(threads)],
                                capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"ok": False, "reason": f"no output within {timeout}s", "model": str(model)}
    if result.returncode != 0:
        import signal

        tail = (result.stderr.strip().splitlines() or [""])[-1][:300]
        killed = -result.returncode if result.returncode < 0 else None
        # a crash leaves llama.cpp's last (often harmless) log line on stderr: name the signal instead
        reason = f"killed by {signal.Signals(killed).name}" if killed in set(signal.Signals) else tail
        return {"ok": False, "model": str(model), "exit": result.returncode, "signal": killed, "reason": reason,
                "stderr_tail": tail}
    try:
        reply = json.loads(result.stdout.strip().splitlines()[-1])
    except (json.JSONDecodeError, IndexError):
        return {"ok": False, "model": str(model), "reason": "no result line"}
    ok = len(reply.get("generated", [])) == 8
    return {"ok": ok, "model": str(model), **reply}


def read_build_info(directory: Path | None = None) -> dict:
    path = (directory or install_dir()) / "build.json"
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def install(force: bool = False, progress: bool = True, jobs: int | None = None, tools: bool = True) -> dict:
    """Build and self-test llama-cpp-python into the user cache, then (``tools``) the upstream tools;
    returns build.json's content."""
    def say(message: str) -> None:
        if progress:
            print(f"[llamacpp] {message}", file=sys.stderr, flush=True)

    target = install_dir()
    if target.is_dir() and not force:
        info = read_build_info(target)
        tools_ok = set(info.get("tools", [])) == set(TOOLS) and not any(
            _tool_starts(target / "bin" / tool) for tool in TOOLS)  # earlier installs copied them without their libraries
        if info.get("self_test", {}).get("ok") and (not tools or tools_ok):
            return {**info, "already_installed": True}
    for tool in ("cmake", "c++"):
        if shutil.which(tool) is None:
            raise EdgePruneError(f"building llama.cpp needs {tool} on PATH (e.g. apt-get install cmake g++)")
    started = time.perf_counter()
    root().mkdir(parents=True, exist_ok=True)
    log = root() / "install.log"
    src = _source(_sdist(log, say))
    jobs = jobs or os.cpu_count() or 2
    attempts = []
    for variant in ("native", "portable"):
        build, flags, build_log = _build(src, variant, jobs, say)
        staging = Path(tempfile.mkdtemp(prefix=".install.tmp-", dir=root()))
        try:
            _assemble(staging, src, build, build_log)
            say("self-test: generating 8 tokens in a child process")
            test = self_test(staging / "site", self_test_model(staging))
            attempts.append({"variant": variant, "self_test": test})
            if not test["ok"]:
                say(f"the {variant} build failed its self-test ({test.get('reason') or test}); "
                    + ("rebuilding with GGML_NATIVE=OFF and AMX off" if variant == "native" else "giving up"))
                continue
            info = {"version": VERSION, "variant": variant, "cmake_flags": flags, "cpu": cpu_name(),
                    "amx_int8": "amx_int8" in cpu_flags(), "self_test": test, "attempts": attempts,
                    "build_log": str(build_log), "tools": [], "seconds": round(time.perf_counter() - started, 1)}
            (staging / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            if target.exists():
                shutil.rmtree(target)
            os.replace(staging, target)
            if variant != "native":
                say(f"the native build crashed in its self-test ({attempts[0]['self_test'].get('reason')}); "
                    "installed the GGML_NATIVE=OFF build without AMX instead")
            if tools:
                info["tools"] = _build_tools(build, build_log, jobs, say)
                info["seconds"] = round(time.perf_counter() - started, 1)
                (target / "build.json").write_text(json.dumps(info, indent=2) + "\n")
            return {**info, "already_installed": False}
        finally:
            if staging.exists():
                shutil.rmtree(staging, ignore_errors=True)
    raise EdgePruneError(f"llama.cpp builds failed their self-test ({attempts[-1]['self_test'].get('reason')}); "
                         f"see the logs in {root()}")
