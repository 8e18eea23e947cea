"""Benchmark worker process: ``python -m edgeprune.bench.worker`` (see ``edgeprune.bench.workers``).

Protocol: one JSON object per line on stdin, one reply per line on stdout. Everything else the libraries
print goes to stderr so it cannot corrupt the protocol.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from edgeprune.bench.energy import EnergyMeter
from edgeprune.core.onnxio import build_feeds, consume, has_past, present_to_past, timed_calls
from edgeprune.runtime.base import get_runtime


def _rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes(pid: int | str = "self") -> int | None:
    """VmHWM: a process's own RSS high-water mark. (ru_maxrss would be wrong here: Linux carries the
    parent's peak across fork+exec, so every worker of a parent that had loaded torch would report it.)"""
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 if pid == "self" else None


def _children_peak_rss() -> int:
    """Peak RSS of helper processes that hold the model (DeepSparse runs in its own venv process)."""
    try:
        import psutil
    except ImportError:
        return 0
    return sum(_peak_rss_bytes(child.pid) or 0 for child in psutil.Process().children(recursive=True))


def _children_cpu_and_rss() -> tuple[float, int]:
    """CPU seconds and RSS of helper processes a runtime may run (e.g. the DeepSparse worker)."""
    try:
        import psutil
    except ImportError:
        return 0.0, 0
    cpu, rss = 0.0, 0
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            cpu += times.user + times.system
            rss += child.memory_info().rss
        except psutil.Error:
            continue
    return cpu, rss


def _model_dir(model: str) -> Path:
    path = Path(model)
    return path.parent if path.is_file() else path


class Worker:
    def __init__(self):
        self.session = None
        self.meter = EnergyMeter.open()
        self.baseline_rss = _rss_bytes()

    # --- requests -------------------------------------------------------------------------------
    def load(self, msg):
        self.model, self.runtime, self.threads = msg["model"], msg["runtime"], msg.get("threads")
        started = time.perf_counter()
        self.baseline_rss = _rss_bytes()
        self.session = get_runtime(self.runtime).load(self.model, threads=self.threads)
        config_path = _model_dir(self.model) / "config.json"
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
        self.vocab_size = int(config.get("vocab_size") or getattr(self.session, "vocab_size", 0) or 1000)
        manifest_path = _model_dir(self.model) / "manifest.json"
        manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
        self.kv_layout = manifest.get("kv_layout")
        return {"load_s": time.perf_counter() - started, "pid": os.getpid(),
                # KV-cache decode changes the past length every step: a static-shape runtime (DeepSparse) is
                # timed by its own fixed-capacity decode_timings, or only by prefill when it has none.
                "decoder": getattr(self.session, "stateful_decoder", False) or (
                    has_past(i.name for i in self.session.inputs) and (
                        not getattr(self.session, "static_shapes", False) or hasattr(self.session, "decode_timings"))),
                "build": self.session.build_flags() if hasattr(self.session, "build_flags") else None,
                "inputs": [[i.name, list(i.shape), i.dtype] for i in self.session.inputs],
                "outputs": [[o.name, list(o.shape), o.dtype] for o in self.session.outputs],
                "rss_after_load": _rss_bytes(), "baseline_rss": self.baseline_rss}

    def _measure(self, fn):
        child_cpu0, _ = _children_cpu_and_rss()
        cpu0, energy0, wall0 = time.process_time(), self.meter.read(), time.perf_counter()
        result = fn()
        wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
        energy = self.meter.delta_uj(energy0, self.meter.read())
        child_cpu1, _ = _children_cpu_and_rss()
        return result, {"wall_s": wall, "cpu_s": cpu + max(0.0, child_cpu1 - child_cpu0), "energy_uj": energy}

    def _run(self, feeds):
        return self.session.run(feeds)

    def time(self, msg):
        feeds = build_feeds(self.session.inputs, msg["batch"], msg["seq"], self.vocab_size, msg.get("seed", 0),
                            kv_layout=self.kv_layout)
        iterations, warmup = int(msg["iterations"]), int(msg.get("warmup", 0))
        # Runtimes computing in this process are timed here on ``session.run`` (every output consumed); others
        # (DeepSparse runs in its own venv process) by ``session.benchmark``, so the pipe is not measured.
        if not get_runtime(self.runtime, require_available=False).target.in_process:
            # The model runs in another process: only the session's own in-process timing excludes IPC.
            def call():
                times = self.session.benchmark(feeds, iterations, warmup)
                return times, consume(self.session.run(feeds))
        else:
            def call():
                return timed_calls(self._run, feeds, iterations, warmup)
        (times, checksum), usage = self._measure(call)
        return {"latencies": times, "checksum": checksum, **usage}

    def decode(self, msg):
        """Prefill a prompt of ``seq`` tokens, then ``new_tokens`` greedy steps with the KV cache;
        ``iterations`` repeats. Per-step latencies exclude nothing but the argmax of the next token."""
        batch, seq, steps = msg["batch"], msg["seq"], int(msg["new_tokens"])
        if hasattr(self.session, "decode_timings"):  # llama.cpp (cache inside), DeepSparse (fixed capacity)
            return self._session_decode(msg, batch, seq, steps)
        inputs = self.session.inputs
        prompt = build_feeds(inputs, batch, seq, self.vocab_size, msg.get("seed", 0), kv_layout=self.kv_layout)
        prefill_times, step_times, checksum = [], [], 0.0
        clock = time.perf_counter

        def once(record: bool):
            nonlocal checksum
            start = clock()
            out = self.session.run(prompt)
            logits = out["logits"]
            token = logits[:, -1].argmax(-1)  # consumes the logits inside the timed region
            elapsed = clock() - start
            if record:
                prefill_times.append(elapsed)
            past, length = present_to_past(out), seq
            steps_this = []
            for _ in range(steps):
                feeds = build_feeds(inputs, batch, 1, self.vocab_size, past_len=length, past=past,
                                    kv_layout=self.kv_layout)
                feeds["input_ids"] = token.reshape(batch, 1).astype(feeds["input_ids"].dtype)
                start = clock()
                out = self.session.run(feeds)
                token = out["logits"][:, -1].argmax(-1)
                steps_this.append(clock() - start)
                past, length = present_to_past(out), length + 1
                checksum += float(token.sum())
            if record:
                step_times.append(steps_this)

        def call():
            for _ in range(int(msg.get("warmup", 0))):
                once(False)
            for _ in range(int(msg["iterations"])):
                once(True)

        _, usage = self._measure(call)
        return {"prefill_latencies": prefill_times, "step_latencies": step_times, "checksum": checksum, **usage}

    def _session_decode(self, msg, batch, seq, steps):
        """The same measurement by the session's own ``decode_timings`` (llama.cpp keeps its KV cache inside;
        DeepSparse times inside its process, in its fixed-capacity layout): batch 1 only."""
        if batch != 1:
            raise RuntimeError(f"{self.runtime} decodes one sequence at a time (got batch {batch})")
        prompt = build_feeds(self.session.inputs, 1, seq, self.vocab_size, msg.get("seed", 0),
                             kv_layout=self.kv_layout)["input_ids"]
        prefill_times, step_times, checksum = [], [], 0.0

        def call():
            nonlocal checksum
            for _ in range(int(msg.get("warmup", 0))):
                self.session.decode_timings(prompt, steps)
            for _ in range(int(msg["iterations"])):
                prefill, per_step, total = self.session.decode_timings(prompt, steps)
                prefill_times.append(prefill)
                step_times.append(per_step)
                checksum += total

        _, usage = self._measure(call)
        return {"prefill_latencies": prefill_times, "step_latencies": step_times, "checksum": checksum, **usage}

    def memory(self, msg):
        _, child_rss = _children_cpu_and_rss()
        own, children = _peak_rss_bytes(), _children_peak_rss()
        return {"peak_rss_bytes": own + children, "worker_peak_rss_bytes": own, "child_peak_rss_bytes": children,
                "rss_bytes": _rss_bytes(), "baseline_rss_bytes": self.baseline_rss, "child_rss_bytes": child_rss}

    def quality(self, msg):
        from edgeprune.eval.api import EvalConfig, evaluate_backend
        from edgeprune.eval.backends import runtime_backend

        config = EvalConfig.from_dict(msg["config"])
        # llama.cpp loads the file itself; the ONNX backends want the export directory around it
        model = self.model if Path(self.model).is_dir() or self.runtime == "llamacpp" else str(_model_dir(self.model))
        backend = runtime_backend(model, self.runtime, max_length=config.max_length, threads=self.threads)
        result = evaluate_backend(backend, msg["data"], config, progress=True)  # tqdm on stderr
        path = msg.get("agreement_path")
        if path:
            np.save(path, self._agreement_outputs(backend, config, msg["data"], int(msg.get("agreement_n", 64))))
            result["agreement_path"] = path
        return result

    def _agreement_outputs(self, backend, config, data, n):
        """Outputs compared with dense: sentence embeddings (sts) or next-token logits on a window (ppl)."""
        from edgeprune.core.datasets import read_corpus, read_sts

        if config.task in ("lambada", "hellaswag", "piqa"):  # next-token logits on the first item's context
            from edgeprune.eval.zeroshot import read_items

            ids = backend.encode_for_scoring(read_items(config.task, data, limit=1)[0].context)[:n]
            return np.asarray(backend.logits(np.asarray(ids, dtype=np.int64)[None, :]), dtype=np.float32)
        if config.task == "sts":
            pairs = read_sts(data, limit=max(1, n // 2))
            sentences = [s for p in pairs for s in (p.sentence1, p.sentence2)][:n]
            return np.asarray(backend.embed(sentences), dtype=np.float32)
        ids = np.asarray(backend.encode(read_corpus(data)), dtype=np.int64)[:min(n, config.window)]
        return np.asarray(backend.logits(ids[None, :]), dtype=np.float32)

    # --- loop -----------------------------------------------------------------------------------
    def serve(self, stdin, stdout):
        for line in stdin:
            if not line.strip():
                continue
            msg = json.loads(line)
            op = msg.get("op")
            if op == "exit":
                break
            try:
                if op != "load" and self.session is None:
                    raise RuntimeError("no model loaded")
                reply = getattr(self, op)(msg) if op in ("load", "time", "decode", "memory", "quality") else None
                if reply is None:
                    raise RuntimeError(f"unknown request {op!r}")
            except Exception as exc:  # reported to the parent as one line; the traceback goes to stderr
                if os.environ.get("EDGEPRUNE_DEBUG"):
                    traceback.print_exc()
                message = str(exc) if exc.__class__.__name__ == "EdgePruneError" else f"{exc.__class__.__name__}: {exc}"
                reply = {"error": message}
            stdout.write(json.dumps(reply, default=float) + "\n")
            stdout.flush()
        if self.session is not None and hasattr(self.session, "close"):
            self.session.close()


def main() -> int:
    import signal

    # Ctrl-C reaches the whole process group: the parent handles it and closes this worker (or this worker
    # sees stdin close), so the worker itself must not die mid-reply with a traceback.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    protocol_out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # stray prints (also from C++) go to stderr
    sys.stdout = sys.stderr
    try:
        Worker().serve(sys.stdin, protocol_out)
    except BrokenPipeError:  # the parent went away (interrupted or terminated): nothing left to answer
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), protocol_out.fileno())  # no second error at exit flush
        except OSError:
            pass
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
