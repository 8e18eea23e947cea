"""One worker process per benchmarked model.

Each worker (``python -m edgeprune.bench.worker``) loads its session once and then answers JSON-line
requests on stdin ("time this shape N times", "decode", "quality", "memory"). Timing happens inside the
worker, so pipes are never part of a latency, and each process's peak RSS belongs to one model only.
The harness drives several workers round-robin so all models see the same machine conditions.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeprune.core.errors import EdgePruneError

# Runtimes whose sessions compute in this process: the worker times ``session.run`` itself and consumes
# every output. Others (DeepSparse runs in its own venv process) are timed by ``session.benchmark`` so the
# pipe to them is not measured.
IN_PROCESS_RUNTIMES = {"onnxruntime", "llamacpp"}
_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")
# Token ids below this are usually special tokens; random inputs avoid them.
FIRST_ORDINARY_ID = 5


def consume(outputs) -> float:
    """Touch every output so a lazy runtime must have produced it; the value goes into a checksum.

    Reading the first and last element of each array is enough to force materialisation without adding
    a full reduction to the timed region."""
    total = 0.0
    values = outputs.values() if isinstance(outputs, dict) else outputs
    for array in values:
        flat = np.asarray(array).reshape(-1)
        if flat.size:
            total += float(flat[0]) + float(flat[-1])
    return total


def timed_calls(run, feeds: dict, iterations: int, warmup: int = 0) -> tuple[list[float], float]:
    """Call ``run(feeds)`` warmup + iterations times; per-call seconds of the timed ones and a checksum
    of every timed call's outputs (consumed inside the timed region)."""
    for _ in range(warmup):
        consume(run(feeds))
    times, checksum = [], 0.0
    clock = time.perf_counter
    for _ in range(iterations):
        start = clock()
        checksum += consume(run(feeds))
        times.append(clock() - start)
    return times, checksum


def _dim(value, default: int) -> int:
    return value if isinstance(value, int) and value > 0 else default


def is_decoder_session(inputs) -> bool:
    return any(info.name.startswith("past_key_values") for info in inputs)


def build_feeds(inputs, batch: int, seq: int, vocab_size: int, seed: int = 0, past_len: int = 0,
                past: dict[str, np.ndarray] | None = None, kv_layout: list[dict] | None = None) -> dict[str, np.ndarray]:
    """Deterministic inputs from (batch, seq, seed): every model gets identical token ids.

    Decoder sessions get past key/values of length ``past_len`` (zeros, or the given ``past`` arrays,
    keyed by input name) with each layer's own KV-head count: from the export manifest's ``kv_layout``,
    else from the fixed dims of the input metadata."""
    rng = np.random.default_rng(seed)
    high = max(vocab_size, FIRST_ORDINARY_ID + 1)
    ids = rng.integers(min(FIRST_ORDINARY_ID, high - 1), high, size=(batch, seq), dtype=np.int64)
    feeds: dict[str, np.ndarray] = {}
    for info in inputs:
        dtype = np.dtype(info.dtype)
        name = info.name
        if name == "input_ids":
            feeds[name] = ids.astype(dtype)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, past_len + seq), dtype=dtype)
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, seq), dtype=dtype)
        elif name == "position_ids":
            feeds[name] = np.tile(np.arange(past_len, past_len + seq, dtype=dtype), (batch, 1))
        elif name.startswith("past_key_values"):
            if past is not None and name in past:
                feeds[name] = past[name]
            else:
                shape = list(info.shape)
                kv_heads = _dim(shape[1] if len(shape) > 1 else None, 1)
                head_dim = _dim(shape[-1] if shape else None, 1)
                match = _PAST.match(name)
                if kv_layout and match and int(match.group(1)) < len(kv_layout):
                    layer = kv_layout[int(match.group(1))]
                    kv_heads, head_dim = int(layer["kv_heads"]), int(layer["head_dim"])
                feeds[name] = np.zeros((batch, kv_heads, past_len, head_dim), dtype=dtype)
        elif name == "cache_position":
            feeds[name] = np.arange(past_len, past_len + seq, dtype=dtype)
        else:
            raise EdgePruneError(f"benchmark: don't know how to fill model input {name!r}")
    return feeds


def present_to_past(outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Optimum naming: output ``present.N.key`` feeds input ``past_key_values.N.key``."""
    return {name.replace("present", "past_key_values", 1): value
            for name, value in outputs.items() if name.startswith("present")}


class WorkerClient:
    """Parent-side handle of one worker process."""

    def __init__(self, label: str, model_path: str | Path, runtime: str, threads: int | None,
                 env: dict[str, str] | None = None):
        self.label = label
        cmd = [sys.executable, "-m", "edgeprune.bench.worker"]
        worker_env = dict(os.environ, **(env or {}))
        # Keep numpy/OpenMP helpers from spawning their own thread pools beside the runtime's.
        worker_env.setdefault("OMP_NUM_THREADS", str(threads or 1))
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None,
                                     text=True, bufsize=1, env=worker_env)
        self.info = self.request({"op": "load", "model": str(model_path), "runtime": runtime, "threads": threads})

    def request(self, message: dict[str, Any]) -> dict[str, Any]:
        if self.proc.poll() is not None:
            raise EdgePruneError(f"benchmark worker for {self.label} exited (code {self.proc.returncode})")
        self.proc.stdin.write(json.dumps(message) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            raise EdgePruneError(f"benchmark worker for {self.label} died during {message['op']!r} (exit {code})")
        reply = json.loads(line)
        if "error" in reply:
            raise EdgePruneError(f"{self.label}: {reply['error']}")
        return reply

    def close(self, kill: bool = False) -> None:
        """Ask the worker to exit; ``kill``: stop it now (the run was interrupted, no reply will be read)."""
        if kill and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
            return
        if self.proc.poll() is None:
            try:
                self.proc.stdin.write(json.dumps({"op": "exit"}) + "\n")
                self.proc.stdin.flush()
                self.proc.wait(timeout=30)
            except (BrokenPipeError, subprocess.TimeoutExpired):
                self.proc.kill()
                self.proc.wait()
