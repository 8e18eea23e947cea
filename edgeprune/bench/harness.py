"""The benchmark harness: dense and candidate models, same runtime, threads and inputs, interleaved.

Per runtime, every model gets its own worker process. For each (batch, seq) shape the harness first warms
every worker up and calibrates how many calls fill ``round_seconds``, then runs ``rounds`` rounds; in
round r the models are visited in the model list rotated by r (A B C, B C A, C A B, ...), so slow drifts
of a shared machine hit all models alike. The executed order is recorded in the report.
"""

from __future__ import annotations

import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from edgeprune.core.configs import FrozenConfig
from edgeprune.core.errors import EdgePruneError


@dataclass(frozen=True)
class BenchConfig(FrozenConfig):
    runtimes: tuple[str, ...] = ("onnxruntime",)
    batches: tuple[int, ...] = (1,)
    seqs: tuple[int, ...] = (128,)
    threads: int | None = None  # intra-op threads for every model (None: runtime default)
    rounds: int = 8  # interleaved rounds per shape
    warmup: int = 3  # untimed calls per model and shape before the rounds
    round_seconds: float = 0.25  # target timed seconds per model per round (sets calls per round)
    max_calls_per_round: int = 500
    new_tokens: int = 16  # decoders: greedy KV-cache steps timed per decode round
    task: str | None = None  # sts | perplexity | lambada | hellaswag | piqa: also measure quality on `data`
    data: str | None = None
    eval_limit: int | None = None  # sts pairs / zero-shot items (None: all)
    eval_max_tokens: int = 20000  # perplexity tokens
    eval_max_length: int = 128
    agreement_n: int = 64  # sentences (sts) or tokens (perplexity) compared with dense
    watts_per_core: float = 4.0  # energy estimate model when no RAPL counter is readable
    seed: int = 0

    def __post_init__(self):
        if not self.runtimes or not self.batches or not self.seqs:
            raise EdgePruneError("benchmark needs at least one runtime, batch size and sequence length")
        if any(b < 1 for b in self.batches) or any(s < 1 for s in self.seqs):
            raise EdgePruneError("batch sizes and sequence lengths must be positive")
        if self.rounds < 1 or self.warmup < 0 or self.round_seconds <= 0:
            raise EdgePruneError("rounds must be >= 1, warmup >= 0, round_seconds > 0")
        from edgeprune.eval.api import TASKS, ZERO_SHOT

        if self.task is not None and self.task not in TASKS:
            raise EdgePruneError(f"unknown benchmark task {self.task!r}; choose from {', '.join(TASKS)}")
        if self.eval_limit is not None and self.eval_limit < 1:
            raise EdgePruneError(f"--eval-limit must be >= 1 (got {self.eval_limit})")
        if self.task is not None and not self.data and self.task not in ZERO_SHOT:
            raise EdgePruneError(f"--task {self.task} needs --data PATH")
        if self.threads is not None and self.threads < 1:
            raise EdgePruneError(f"--threads must be >= 1 (got {self.threads})")
        if not self.watts_per_core > 0:
            raise EdgePruneError(f"--watts-per-core must be > 0 (got {self.watts_per_core})")
        if self.new_tokens < 1 or self.max_calls_per_round < 1 or self.agreement_n < 1:
            raise EdgePruneError(f"--new-tokens must be >= 1 (got {self.new_tokens})")
        if self.eval_limit is not None and self.eval_limit < 2:
            raise EdgePruneError(f"--eval-limit must be >= 2 (got {self.eval_limit}): a Spearman correlation needs "
                                 "at least two pairs")
        if self.eval_max_tokens < 2 or self.eval_max_length < 2:
            raise EdgePruneError(f"--eval-max-tokens must be >= 2 (got {self.eval_max_tokens})")


@dataclass
class BenchModel:
    label: str
    source: str  # what the user gave
    path: Path  # export dir (or .onnx file) the runtimes load
    role: str  # "dense" | "candidate"
    exported_here: bool = False


# --- preparing inputs ---------------------------------------------------------------------------------

def is_export(path: Path) -> bool:
    from edgeprune.core.artifacts import is_artifact, read_manifest

    path = Path(path)
    if path.is_file() and path.suffix in (".onnx", ".gguf"):
        return True
    if path.is_dir() and is_artifact(path):
        return read_manifest(path).get("stage") == "export"
    return path.is_dir() and (path / "model.onnx").is_file()


def export_model(source: str, out: Path, task: str | None, quantize: str | None = None,
                 target: str | None = None) -> Path:
    """Export a model source or compressed artifact (fp32 unless asked) with edgeprune.exporters."""
    try:
        from edgeprune.exporters.api import ExportConfig, export
    except ImportError as exc:
        raise EdgePruneError(f"{source} is not an exported model and the exporter is unavailable ({exc}): export it "
                             f"first with `edgeprune export {source} -o DIR` where edgeprune[full] is installed, "
                             "or pip install 'edgeprune[full]'") from None
    fields = {"task": task} if task else {}
    if quantize:
        fields["quantize"] = quantize
    if target:
        fields["target"] = target
    export(source, out, ExportConfig.from_dict(fields))
    return out


def check_labels(labels: list[str] | None, candidates: list[str]) -> list[str]:
    """One display name per model (dense first), or names derived from the paths."""
    labels = list(labels) if labels else ["dense"] + unique_labels(list(candidates))
    if len(labels) != len(candidates) + 1:
        raise EdgePruneError(f"--label given {len(labels)} times for {len(candidates) + 1} models (dense and "
                             f"{len(candidates)} candidates); give one label per model, dense first, or none")
    if len(set(labels)) != len(labels):
        raise EdgePruneError(f"model labels must be unique: {labels}")
    return labels


def unique_labels(sources: list[str]) -> list[str]:
    labels, seen = [], {}
    for source in sources:
        base = Path(source.rstrip("/")).name or source
        base = base.removesuffix(".onnx")
        count = seen.get(base, 0)
        seen[base] = count + 1
        labels.append(base if count == 0 else f"{base}-{count + 1}")
    return labels


def model_config(source: str) -> tuple[dict, str] | None:
    """config.json of a benchmark source (export dir, .onnx file, artifact, model dir or alias) and where
    it was read; None when the source has none on disk (hub ids, GGUF files)."""
    import json

    path = Path(source).expanduser()
    if not path.exists():
        from edgeprune.core.loading import resolve

        resolved = resolve(source)
        if resolved.kind == "gguf" or resolved.kind == "hub":
            return None
        path = Path(resolved.path)
    directory = path.parent if path.is_file() else path
    config_path = directory / "config.json"
    if not config_path.is_file():
        return None
    try:
        return json.loads(config_path.read_text()), str(directory)
    except (OSError, ValueError):
        raise EdgePruneError(f"{config_path}: unreadable config.json") from None


def check_sources(sources: list[str], config: BenchConfig) -> None:
    """Before anything runs: every source exists, candidates are variants of the dense model (same
    architecture family and vocabulary; a BERT vs GPT-2 'speedup' means nothing), and every sequence length
    fits each model's position table."""
    from edgeprune.core.loading import resolve
    from edgeprune.runtime.pipelines import check_positions

    configs = []
    for source in sources:
        if not is_export(Path(source).expanduser()):
            resolve(source)  # a missing source fails here, not after the first (slow) export
        configs.append(model_config(source))
    dense = configs[0]
    for source, found in zip(sources, configs):
        if found is None:
            continue
        cfg, where = found
        decoder = config.task == "perplexity" or "ForCausalLM" in " ".join(cfg.get("architectures") or []) \
            or "LMHead" in " ".join(cfg.get("architectures") or [])
        longest = max(config.seqs) + (config.new_tokens if decoder else 0)
        check_positions(cfg, longest, "--seq" + (" + --new-tokens" if decoder else ""), where)
        if dense is None or source == sources[0]:
            continue
        identity = (cfg.get("model_type"), cfg.get("vocab_size"))
        reference = (dense[0].get("model_type"), dense[0].get("vocab_size"))
        if identity != reference:
            raise EdgePruneError(f"candidate {source} is a {identity[0]} model (vocabulary {identity[1]}) but the dense "
                                 f"reference {sources[0]} is {reference[0]} (vocabulary {reference[1]}); bench compares "
                                 "a model with its own compressed or exported variants")


def prepare_models(dense: str, candidates: list[str], work: Path, export_task: str | None,
                   labels: list[str] | None = None, log: Callable[[str], None] = print,
                   target: str | None = None) -> list[BenchModel]:
    sources = [dense] + list(candidates)
    labels = check_labels(labels, candidates)
    models = []
    for i, (label, source) in enumerate(zip(labels, sources)):
        path = Path(source).expanduser()
        exported = False
        if not is_export(path):
            out = work / "exports" / label
            log(f"exporting {source} -> {out} (fp32)")
            export_model(source, out, export_task, target=target)
            path, exported = out, True
        models.append(BenchModel(label, source, path, "dense" if i == 0 else "candidate", exported))
    return models


# --- measuring ------------------------------------------------------------------------------------------

def _calls_for(latency_s: float, config: BenchConfig) -> int:
    return int(min(config.max_calls_per_round, max(1, math.ceil(config.round_seconds / max(latency_s, 1e-6)))))


def rotated(labels: list[str], round_index: int) -> list[str]:
    k = round_index % len(labels)
    return labels[k:] + labels[:k]


def measure_runtime(models: list[BenchModel], runtime: str, config: BenchConfig,
                    log: Callable[[str], None] = print) -> tuple[dict[str, Any], list[dict]]:
    """Run the interleaved measurement for one runtime. Returns per-model raw results and the order."""
    from tqdm.auto import tqdm

    from edgeprune.bench.workers import WorkerClient

    raw: dict[str, Any] = {}
    clients: dict[str, WorkerClient] = {}
    order: list[dict] = []
    try:
        for model in models:
            try:
                clients[model.label] = WorkerClient(model.label, model.path, runtime, config.threads)
                raw[model.label] = {"load": clients[model.label].info, "forward": {}, "decode": {}}
            except EdgePruneError as exc:
                if model.role == "dense":
                    raise
                log(f"skipping {model.label} on {runtime}: {exc}")
                raw[model.label] = {"skipped": str(exc)}
        labels = [m.label for m in models if m.label in clients]
        shapes = [(b, s) for b in config.batches for s in config.seqs]
        total = len(shapes) * config.rounds * len(labels)
        bar = tqdm(total=total, desc=f"bench {runtime}", leave=False)
        for batch, seq in shapes:
            key = f"b{batch}_s{seq}"
            spec = {"op": "time", "batch": batch, "seq": seq, "seed": config.seed}
            calls: dict[str, int] = {}
            for label in list(labels):  # warm-up and calibration, in list order
                try:
                    _warm_up(clients[label], raw[label], key, spec, config, calls)
                except EdgePruneError as exc:
                    _drop(label, labels, raw, clients, models, runtime, exc, log)
            for round_index in range(config.rounds):
                for label in rotated(labels, round_index):
                    try:
                        order.extend(_one_round(clients[label], raw[label], key, spec, config, calls[label],
                                                runtime, round_index, label))
                    except EdgePruneError as exc:
                        _drop(label, labels, raw, clients, models, runtime, exc, log)
                    bar.update(1)
        bar.close()
        for label in labels:
            raw[label]["memory"] = clients[label].request({"op": "memory"})
    except BaseException:
        for client in clients.values():
            client.close(kill=True)
        raise
    for client in clients.values():
        client.close()
    return raw, order


def _drop(label, labels, raw, clients, models, runtime, exc, log) -> None:
    """A candidate that fails mid-run is reported as skipped; the dense reference failing ends the run."""
    if next(m for m in models if m.label == label).role == "dense":
        raise exc
    log(f"dropping {label} on {runtime}: {exc}")
    labels.remove(label)
    raw[label] = {"skipped": str(exc)}
    clients.pop(label).close()


def _warm_up(client, raw: dict, key: str, spec: dict, config: BenchConfig, calls: dict) -> None:
    batch, seq = spec["batch"], spec["seq"]
    reply = client.request(dict(spec, iterations=max(1, config.warmup), warmup=1))
    calls[client.label] = _calls_for(float(np.median(reply["latencies"])), config)
    raw["forward"][key] = {"batch": batch, "seq": seq, "rounds": [], "checksum": 0.0, "cpu_s": 0.0,
                           "energy_uj": 0, "energy_complete": True, "calls_per_round": calls[client.label],
                           "warmup_calls": max(1, config.warmup) + 1}
    if client.info.get("decoder"):
        client.request({"op": "decode", "batch": batch, "seq": seq, "new_tokens": 2, "iterations": 1,
                        "warmup": 0, "seed": config.seed})
        raw["decode"][key] = {"batch": batch, "seq": seq, "new_tokens": config.new_tokens, "rounds": [],
                              "prefill": [], "checksum": 0.0}


def _one_round(client, raw: dict, key: str, spec: dict, config: BenchConfig, calls: int, runtime: str,
               round_index: int, label: str) -> list[dict]:
    executed = []
    entry = raw["forward"][key]
    reply = client.request(dict(spec, iterations=calls, warmup=0))
    entry["rounds"].append(reply["latencies"])
    entry["checksum"] += reply["checksum"]
    entry["cpu_s"] += reply["cpu_s"]
    if reply["energy_uj"] is None:
        entry["energy_complete"] = False
    else:
        entry["energy_uj"] += reply["energy_uj"]
    where = {"runtime": runtime, "batch": spec["batch"], "seq": spec["seq"], "round": round_index, "model": label}
    executed.append(dict(where, kind="forward", calls=calls, t=round(time.time(), 3)))
    if client.info.get("decoder"):
        d = raw["decode"][key]
        reply = client.request({"op": "decode", "batch": spec["batch"], "seq": spec["seq"],
                                "new_tokens": config.new_tokens, "iterations": 1, "warmup": 0, "seed": config.seed})
        d["rounds"].extend(reply["step_latencies"])
        d["prefill"].extend(reply["prefill_latencies"])
        d["checksum"] += reply["checksum"]
        executed.append(dict(where, kind="decode", calls=config.new_tokens, t=round(time.time(), 3)))
    return executed


def measure_quality(models: list[BenchModel], runtime: str, config: BenchConfig, work: Path,
                    log: Callable[[str], None] = print) -> dict[str, Any]:
    """Task metric of each model through ``runtime`` plus the outputs used for agreement with dense.
    Runs after timing, one model at a time, in fresh workers (so it never inflates timing-phase memory)."""
    from edgeprune.bench.workers import WorkerClient
    from edgeprune.eval.api import EvalConfig

    eval_config = EvalConfig(task=config.task, limit=config.eval_limit, max_tokens=config.eval_max_tokens,
                             max_length=config.eval_max_length)
    work.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {}
    for model in models:
        log(f"quality: {model.label} ({config.task}, {runtime})")
        try:
            client = WorkerClient(model.label, model.path, runtime, config.threads)
        except EdgePruneError as exc:
            if model.role == "dense":
                raise
            results[model.label] = {"skipped": str(exc)}
            continue
        try:
            results[model.label] = client.request({
                "op": "quality", "config": eval_config.to_dict(), "data": str(config.data),
                "agreement_path": str(work / f"agreement-{model.label}-{runtime}.npy"),
                "agreement_n": config.agreement_n})
        except EdgePruneError as exc:
            # Timings already measured stay valid; the report says why this model has no quality figure.
            log(f"quality failed for {model.label}: {exc}")
            results[model.label] = {"error": str(exc)}
        except BaseException:
            client.close(kill=True)
            raise
        client.close()
    return results


def agreement_vs_dense(quality: dict[str, Any], dense_label: str, task: str | None = None) -> dict[str, dict | None]:
    """Embeddings (sts): cosine to dense per sentence. Logits (perplexity, zero-shot tasks): also top-1
    next-token agreement."""
    from edgeprune.eval.metrics import agreement

    reference_path = (quality.get(dense_label) or {}).get("agreement_path")
    if not reference_path:
        return {}
    reference = np.load(reference_path)
    out = {}
    for label, result in quality.items():
        path = (result or {}).get("agreement_path")
        if not path:
            out[label] = None
            continue
        candidate = np.load(path)
        result = agreement(reference, candidate) if candidate.shape == reference.shape else None
        if result is not None:
            result["n"] = int(np.prod(reference.shape[:-1]))
            if task == "sts":
                result["top1_agreement"] = None  # argmax over embedding dims means nothing
        out[label] = result
    return out


def environment(config: BenchConfig) -> dict[str, Any]:
    import os

    from edgeprune.core.artifacts import library_versions
    from edgeprune.core.onnxio import default_session_settings

    cpu_model, flags = platform.processor() or "unknown", set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu_model in ("unknown", platform.processor()):
                cpu_model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    wanted = ("sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_vnni",
              "avx_vnni", "avx512_bf16", "amx_tile", "amx_int8", "amx_bf16", "neon", "asimd")
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:
        affinity = os.cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    return {
        "cpu_model": cpu_model,
        "cpu_flags": sorted(f for f in wanted if f in flags),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": affinity,
        "threads": config.threads,
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "libraries": library_versions(),
        "load_average_start": list(load) if load else None,
        # the onnxruntime settings every model is timed with (the same for dense and candidates)
        "onnxruntime_session": default_session_settings(),
    }

