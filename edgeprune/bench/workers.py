"""One worker process per benchmarked model.

Each worker (``python -m edgeprune.bench.worker``) loads its session once and then answers JSON-line
requests on stdin ("time this shape N times", "decode", "quality", "memory"). Timing happens inside the
worker, so pipes are never part of a latency, and each process's peak RSS belongs to one model only.
The harness drives several workers round-robin so all models see the same machine conditions.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgeprune.core.errors import EdgePruneError



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
