"""DeepSparse 1.8.0 through a long-lived worker process in its own virtualenv.

DeepSparse pins onnx<1.15 and numpy<2, which cannot share an environment with the rest of edgeprune, so
the model runs in ``deepsparse_worker.py`` under the DeepSparse venv's python. The worker loads the model
once and serves many run/benchmark calls; benchmark timing happens inside the worker, so pipe transfer
is never part of a measured latency.

The venv is found at $EDGEPRUNE_DEEPSPARSE_PYTHON (a python executable), else
``edgeprune.core.paths.cache_dir()/deepsparse-venv``, created by ``edgeprune runtime install deepsparse``.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.paths import cache_dir
from edgeprune.runtime.base import ExportTarget, TensorInfo, prepare_feeds, register_runtime

ENV_VAR = "EDGEPRUNE_DEEPSPARSE_PYTHON"
PINNED_REQUIREMENTS = ("deepsparse==1.8.0", "onnx<1.15", "numpy<2")
WORKER = Path(__file__).with_name("deepsparse_worker.py")
INSTALL_HINT = "run `edgeprune runtime install deepsparse` (or set EDGEPRUNE_DEEPSPARSE_PYTHON to a python with deepsparse 1.8.0)"


def venv_dir() -> Path:
    return cache_dir() / "deepsparse-venv"


def worker_python() -> Path:
    env = os.environ.get(ENV_VAR)
    if env:
        return Path(env)
    bindir = "Scripts" if os.name == "nt" else "bin"
    return venv_dir() / bindir / ("python.exe" if os.name == "nt" else "python")


@functools.lru_cache(maxsize=None)
def _probe(python: str) -> str:
    """'' if ``python`` imports deepsparse, else the reason it does not (checked once per process)."""
    if not Path(python).is_file():
        source = f"${ENV_VAR}" if os.environ.get(ENV_VAR) else "the DeepSparse venv"
        return f"{source} python not found at {python}; {INSTALL_HINT}"
    try:
        result = subprocess.run([python, "-c", "import deepsparse, numpy, onnx; print(deepsparse.__version__)"],
                                capture_output=True, text=True, timeout=120,
                                env=_worker_env())
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"cannot start {python} ({exc}); {INSTALL_HINT}"
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["import failed"])[-1]
        return f"{python} cannot import deepsparse ({last}); {INSTALL_HINT}"
    return ""


def _worker_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("NM_DISABLE_ANALYTICS", "1")  # no phoning home from the worker
    env.pop("PYTHONPATH", None)  # the venv must not see this environment's newer numpy/onnx
    env.pop("PYTHONHOME", None)
    return env


def install(force: bool = False, progress: bool = True) -> dict:
    """Create the DeepSparse venv in the user cache (``edgeprune runtime install deepsparse``)."""
    target = venv_dir()
    if target.exists() and not force and not _probe(str(target / "bin" / "python")):
        return {"venv": str(target), "python": str(worker_python()), "seconds": 0.0, "already_installed": True}
    if sys.version_info >= (3, 12):
        raise EdgePruneError("deepsparse 1.8.0 has wheels for python 3.8-3.11 only; install it from a python 3.11")
    started = time.perf_counter()
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".deepsparse-venv.tmp-", dir=target.parent))
    try:
        # Build in a temp dir, then rename: a failed install leaves nothing behind. Venvs record their own path
        # in scripts but the interpreter itself works after a rename, which is all the worker needs.
        subprocess.run([sys.executable, "-m", "venv", str(staging)], check=True, capture_output=True, text=True)
        pip = [str(staging / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check"]
        if not progress:
            pip.append("--quiet")
        result = subprocess.run(pip + list(PINNED_REQUIREMENTS), text=True,
                                stdout=None if progress else subprocess.PIPE, stderr=subprocess.PIPE)
        if result.returncode != 0:
            last = (result.stderr.strip().splitlines() or ["pip failed"])[-1]
            raise EdgePruneError(f"installing {' '.join(PINNED_REQUIREMENTS)} failed: {last}")
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    except subprocess.CalledProcessError as exc:
        raise EdgePruneError(f"could not create a virtualenv: {(exc.stderr or '').strip()[-200:]}") from None
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    _probe.cache_clear()
    reason = _probe(str(venv_dir() / "bin" / "python"))
    if reason:
        raise EdgePruneError(f"DeepSparse venv installed but not usable: {reason}")
    return {"venv": str(target), "python": str(target / "bin" / "python"),
            "seconds": round(time.perf_counter() - started, 1), "already_installed": False}


def crash_reason(stderr: str) -> str:
    """The line of a DeepSparse crash report that says what failed: its ``Assertion at ...`` line, else the
    signal its handler caught (``Received signal: Segmentation fault ...``; the handler then exits with code 1),
    else the last line that is not the report's closing support e-mail address (which says nothing)."""
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    assertion = next((ln for ln in lines if ln.startswith("Assertion at ")), None)
    if assertion:
        return f"DeepSparse 1.8 aborted: {assertion}"
    caught = next((ln for ln in lines if ln.startswith("Received signal: ")), None)
    if caught:
        return f"DeepSparse 1.8 crashed: {caught.removeprefix('Received signal: ').split(' (')[0]}"
    said = [ln for ln in lines if not ln.startswith("Please email a copy")]
    return said[-1] if said else "no message"


def exit_description(code: int | None) -> str:
    """How a worker process ended: a negative return code is the signal that killed it (a crash in the
    engine's native code leaves no Python traceback, so the signal is all there is to say)."""
    if code is not None and code < 0:
        try:
            return f"killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"killed by signal {-code}"
    return f"exit code {code}"


class DeepSparseSession:
    """A model loaded in a DeepSparse worker process; see ``edgeprune.runtime.base.Session``.

    Engines are compiled per distinct input shape on first use (DeepSparse needs static shapes), so the
    first call with a new shape is slow; ``benchmark`` warm-up covers it.
    """

    static_shapes = True  # pipelines pad sequence lengths to buckets to limit recompiles

    def __init__(self, path: Path, threads: int | None, python: Path):
        self.path = Path(path)
        self.threads = threads
        self._stderr = tempfile.TemporaryFile()
        try:
            self._proc = subprocess.Popen([str(python), str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._stderr, env=_worker_env())
        except OSError as exc:
            raise EdgePruneError(f"cannot start the DeepSparse worker with {python}: {exc}") from None
        try:
            reply = self._call({"op": "load", "path": str(self.path.resolve()), "threads": threads})
        except BaseException:
            self.close()
            raise
        self.deepsparse_version = reply["deepsparse"]
        self.inputs = [TensorInfo(n, tuple(s), d) for n, s, d in reply["inputs"]]
        self.outputs = [TensorInfo(n, tuple(s), d) for n, s, d in reply["outputs"]]

    def _stderr_tail(self) -> str:
        self._stderr.seek(0)
        return crash_reason(self._stderr.read().decode(errors="replace"))

    def _call(self, request: dict) -> dict:
        if self._proc is None:
            raise EdgePruneError("the DeepSparse session is closed")
        payload = pickle.dumps(request, protocol=4)
        try:
            self._proc.stdin.write(struct.pack(">Q", len(payload)) + payload)
            self._proc.stdin.flush()
            header = self._proc.stdout.read(8)
            if len(header) < 8:
                raise EOFError
            body = self._proc.stdout.read(struct.unpack(">Q", header)[0])
        except (BrokenPipeError, EOFError, OSError):
            try:  # the pipe closes a moment before the process is reaped
                code = self._proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                code = None
            raise EdgePruneError(f"the DeepSparse worker died ({exit_description(code)}): {self._stderr_tail()}") from None
        # The worker is our own child process speaking our protocol; its replies are trusted like any
        # in-process library result.
        reply = pickle.loads(body)
        if "error" in reply:
            raise EdgePruneError(f"deepsparse: {reply['error']}")
        return reply

    def _feeds(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return prepare_feeds(self.inputs, feeds)

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        return self._call({"op": "run", "feeds": self._feeds(feeds),
                           "outputs": list(output_names) if output_names else None})["outputs"]

    def benchmark(self, feeds: dict[str, np.ndarray], iterations: int, warmup: int = 0) -> list[float]:
        return list(self._call({"op": "benchmark", "feeds": self._feeds(feeds), "iterations": int(iterations),
                                "warmup": int(warmup)})["times"])

    def decode_timings(self, prompt: np.ndarray, steps: int) -> tuple[float, list[float], float]:
        """Prefill ``prompt`` [1, T], then ``steps`` greedy KV-cache steps, timed inside the DeepSparse process
        (the pipe and the cache transfer are not measured) in DeepSparse's fixed-capacity cache layout, with the
        capacity ``FixedCapacityCache`` would use; (prefill seconds, per-step seconds, checksum of the tokens)."""
        prompt = np.asarray(prompt, np.int64).reshape(1, -1)
        bucket = 64  # FixedCapacityCache.CAPACITY_BUCKET: the same engines a generation compiles
        capacity = -(-(prompt.shape[1] + steps + 1) // bucket) * bucket
        manifest = self.path.parent / "manifest.json"
        layout = json.loads(manifest.read_text()).get("kv_layout") if manifest.is_file() else None
        reply = self._call({"op": "decode_timings", "prompt": prompt, "steps": int(steps), "capacity": capacity,
                            "layout": [[int(row["kv_heads"]), int(row["head_dim"])] for row in layout or []]})
        return reply["prefill"], list(reply["steps"]), reply["checksum"]

    def stats(self) -> dict:
        """Engine compile times by input shape (seconds)."""
        return self._call({"op": "stats"})

    def close(self) -> None:
        proc, self._proc = getattr(self, "_proc", None), None
        if proc is None:
            return
        try:
            payload = pickle.dumps({"op": "close"})
            proc.stdin.write(struct.pack(">Q", len(payload)) + payload)
            proc.stdin.close()
            proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            proc.kill()
            proc.wait()
        finally:
            self._stderr.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


# --- export target -----------------------------------------------------------------------------------------
# DeepSparse 1.8 reads ONNX IR <= 9 (onnx < 1.15) and opsets up to 17 (checked by compiling with it).
DEEPSPARSE_MAX_IR = 9
DEEPSPARSE_MAX_OPSET = 17
# Dynamic-quantization operators: DeepSparse 1.8 aborts on an int8-dynamic export ("please email ...").
# MatMulInteger fed by a static QuantizeLinear (the --target deepsparse int8-static form) compiles.
DEEPSPARSE_UNSUPPORTED_OPS = ("DynamicQuantizeLinear",)
# Measured on MiniLM pruned by the global FLOPs search: FFN widths like 811 or 383 abort DeepSparse 1.8 at
# seq 128 (assertion in fused_ops.cpp) while the same plan rounded down to multiples of 4 compiles and runs.
DEEPSPARSE_WIDTH_MULTIPLE = 4


def deepsparse_python() -> str | None:
    """The DeepSparse interpreter the runtime would use ($EDGEPRUNE_DEEPSPARSE_PYTHON or the installed venv)."""
    python = worker_python()
    return str(python) if python.is_file() else None


def export_config_problems(config) -> list[str]:
    """Export options DeepSparse 1.8 cannot run (``ExportConfig`` fields)."""
    problems = []
    if config.opset > DEEPSPARSE_MAX_OPSET:
        problems.append(f"--target deepsparse: DeepSparse 1.8 supports ONNX opset <= {DEEPSPARSE_MAX_OPSET} "
                        f"(got --opset {config.opset})")
    if config.optimize:
        problems.append("--target deepsparse cannot use --optimize: ORT fusion emits com.microsoft "
                        "operators DeepSparse does not run")
    if config.quantize == "int8-dynamic":
        problems.append("--target deepsparse cannot use --quantize int8-dynamic: DeepSparse 1.8 cannot run "
                        "dynamic INT8 operators (MatMulInteger); use --quantize int8-static --calib PATH")
    if config.quantize.endswith("-weight"):
        problems.append(f"--quantize {config.quantize} cannot be combined with --target deepsparse: "
                        "DeepSparse does not run onnxruntime's MatMulNBits operator; use "
                        "--quantize int8-static or none for DeepSparse")
    return problems


_DS_SCRIPT = r"""
import json, sys
import numpy as np
from deepsparse import compile_model
path, feeds_path, out_path = sys.argv[1:4]
feeds = np.load(feeds_path)
names = json.loads(sys.argv[4])
inputs = [feeds[n] for n in names]
engine = compile_model(path, batch_size=inputs[0].shape[0], input_shapes=[list(x.shape) for x in inputs])
outputs = engine.run(inputs)
np.savez(out_path, *outputs)
"""


def deepsparse_check(path: Path, feeds: dict[str, np.ndarray], timeout: int = 900) -> dict[str, Any]:
    """Compile ``path`` with DeepSparse in its own interpreter and compare one inference on ``feeds`` (one
    static shape) with onnxruntime."""
    from edgeprune.core.onnxio import external_files, ort_session, run_session

    python = deepsparse_python()
    if python is None:
        return {"checked": False, "reason": "no DeepSparse environment (set EDGEPRUNE_DEEPSPARSE_PYTHON)"}
    session = ort_session(path)
    names = [i.name for i in session.get_inputs()]
    expected = run_session(session, feeds)
    with tempfile.TemporaryDirectory(prefix="edgeprune-ds-") as tmp:
        np.savez(Path(tmp) / "feeds.npz", **feeds)
        # A copy: DeepSparse rewrites the input shapes of the file it compiles, in place.
        shutil.copy2(path, Path(tmp) / "model.onnx")
        for data in external_files(path):  # the weights beside a graph over 2 GB stay where they are
            (Path(tmp) / data.name).symlink_to(data.resolve())
        cmd = [python, "-c", _DS_SCRIPT, str(Path(tmp) / "model.onnx"), str(Path(tmp) / "feeds.npz"), str(Path(tmp) / "out.npz"),
               json.dumps(names)]
        started = time.perf_counter()
        try:
            result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            raise EdgePruneError(f"DeepSparse did not compile {path.name} within {timeout}s") from None
        if result.returncode != 0:
            raise EdgePruneError(f"DeepSparse 1.8 rejects {path.name}: {crash_reason(result.stderr or 'no error output')[:300]}")
        with np.load(Path(tmp) / "out.npz") as out:
            got = [out[f"arr_{i}"] for i in range(len(out.files))]
    max_abs = max(float(np.abs(a - b).max()) for a, b in zip(expected.values(), got) if a.size)
    return {"checked": True, "python": python, "compile_and_run_s": round(time.perf_counter() - started, 2),
            "max_abs_vs_onnxruntime": max_abs}


def deepsparse_ready(model) -> list[str]:
    """Why an ONNX model would be refused by DeepSparse 1.8 (empty list: acceptable)."""
    from edgeprune.core.onnxio import opset_of

    problems = []
    if model.graph.sparse_initializer:
        problems.append("it holds sparse initializers")
    if model.ir_version > DEEPSPARSE_MAX_IR:
        problems.append(f"IR version {model.ir_version} > {DEEPSPARSE_MAX_IR}")
    if opset_of(model) > DEEPSPARSE_MAX_OPSET:
        problems.append(f"opset {opset_of(model)} > {DEEPSPARSE_MAX_OPSET}")
    domains = sorted({n.domain for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if domains:
        problems.append(f"it uses non-standard operator domains {domains}")
    dynamic = sorted({n.op_type for n in model.graph.node if n.op_type in DEEPSPARSE_UNSUPPORTED_OPS})
    if dynamic:
        problems.append(f"it uses dynamic INT8 operators {dynamic}, which DeepSparse 1.8 crashes on "
                        "(use --quantize int8-static)")
    if _self_concats(model):
        problems.append("it concatenates a tensor with itself (Llama's rotary embedding), which DeepSparse 1.8's "
                        "compiler aborts on (export with --target deepsparse, which rewrites it)")
    odd = _odd_matmul_widths(model)
    if odd:
        problems.append(f"matrix widths {odd} are not multiples of {DEEPSPARSE_WIDTH_MULTIPLE} (DeepSparse 1.8's "
                        "compiler aborts on them at sequence lengths above 64; compress with "
                        f"--round-to {DEEPSPARSE_WIDTH_MULTIPLE})")
    return problems


def _self_concats(model) -> list:
    return [n for n in model.graph.node if n.op_type == "Concat" and len(n.input) > 1 and len(set(n.input)) == 1]


def deepsparse_form(model) -> dict:
    """Rewrite ``model`` in place into a graph DeepSparse 1.8 compiles: ``Concat(x, x, ...)`` becomes
    ``Tile(x, repeats)``. Its compiler aborts (``Assertion at src/lib/engine/execution/graph.cpp:925``) on a
    Concat that reads one tensor twice, which Llama's rotary embedding (``cat((freqs, freqs), -1)``) is: found by
    bisecting the tiny Llama's graph with DeepSparse compiles; with the rewrite the graph compiles."""
    import numpy as np
    from onnx import numpy_helper, shape_inference

    concats = _self_concats(model)
    if not concats:
        return {"concat_to_tile": 0}
    inferred = shape_inference.infer_shapes(model)  # for the rank of each concatenated tensor
    ranks = {v.name: len(v.type.tensor_type.shape.dim)
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)
             if v.type.tensor_type.HasField("shape")}
    rewritten = 0
    for node in concats:
        rank = ranks.get(node.input[0]) or ranks.get(node.output[0])
        if not rank:
            continue  # left as it is; deepsparse_ready still names it
        axis = next(a.i for a in node.attribute if a.name == "axis")
        repeats = [1] * rank
        repeats[axis] = len(node.input)
        name = f"{node.output[0]}__tile_repeats"
        model.graph.initializer.append(numpy_helper.from_array(np.array(repeats, np.int64), name))
        source = node.input[0]
        del node.input[:]
        node.input.extend([source, name])
        del node.attribute[:]
        node.op_type = "Tile"
        rewritten += 1
    return {"concat_to_tile": rewritten}


def _odd_matmul_widths(model) -> list[int]:
    shapes = {i.name: tuple(i.dims) for i in model.graph.initializer}
    odd = set()
    for node in model.graph.node:
        if node.op_type in ("MatMul", "Gemm", "MatMulInteger"):
            for name in node.input[:2]:
                dims = shapes.get(name, ())
                if len(dims) == 2:
                    odd.update(d for d in dims if d % DEEPSPARSE_WIDTH_MULTIPLE)
    return sorted(odd)


@register_runtime("deepsparse")
class DeepSparseRuntime:
    name = "deepsparse"
    target = ExportTarget("deepsparse", display="DeepSparse 1.8", in_process=False, kv_cache=True,
                          max_opset=DEEPSPARSE_MAX_OPSET, max_ir=DEEPSPARSE_MAX_IR,
                          config_problems=export_config_problems, ready=deepsparse_ready,
                          rewrite=deepsparse_form,
                          check=lambda path, feeds: deepsparse_check(path, feeds),
                          install_hint="edgeprune runtime install deepsparse")

    def available(self) -> bool:
        return not _probe(str(worker_python()))

    def why_unavailable(self) -> str:
        return _probe(str(worker_python()))

    def load(self, model_path: str, threads: int | None = None, **options) -> DeepSparseSession:
        """Load the export's DeepSparse file (dense with zeros, IR <= 9). No ``options`` are accepted."""
        from edgeprune.core.artifacts import onnx_model_path

        if options:
            raise EdgePruneError(f"unknown deepsparse options: {', '.join(sorted(options))}")
        reason = self.why_unavailable()
        if reason:
            raise EdgePruneError(f"runtime 'deepsparse' is not available: {reason}")
        return DeepSparseSession(onnx_model_path(model_path, "deepsparse"), threads, worker_python())
