"""A cost model of a decoder on its target runtime, measured once per host: what removing a block, an
attention sublayer, a query head or an FFN neuron saves in prefill and decode time on llama.cpp.

FLOPs say a block costs its parameters; at batch 1 on llama.cpp a block also costs fixed per-layer work
(norms, RoPE, KV-cache writes, graph nodes, thread barriers), which width pruning never removes. So the
model is linear in five counts of the layer shapes (``FEATURES``): a constant (embedding, LM head, graph),
layers, layers with attention, query heads (with their share of K/V in whole-group pruning) and FFN
neurons. The coefficients are fitted by least squares to the measured prefill and decode times of a set of
*probe* GGUFs cut from the dense q4_0 file itself (whole blocks dropped, FFNs narrowed, heads removed,
attention sublayers removed: ``PROBES``), timed in one interleaved run through the same in-process
llama.cpp path ``edgeprune bench`` uses. The fit's own residuals are stored with it.

The result is cached under ``$EDGEPRUNE_CACHE/cost-models`` with the host's fingerprint (CPU model, flags,
cores, the llama.cpp build flags, threads). A cached model whose fingerprint does not match this host is
never used silently: ``load_or_measure`` warns and measures again (``reuse_foreign=False`` refuses). Torch-free.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError

FEATURES = ("constant", "layers", "attention_layers", "query_heads", "ffn_neurons")
FORMAT = 1
# (query heads, KV heads, FFN width) per layer; a probe is a function of the dense layer shape and count
LayerShape = tuple[int, int, int]


def features(layers: Sequence[LayerShape]) -> list[float]:
    return [1.0, float(len(layers)), float(sum(1 for h, _, _ in layers if h)), float(sum(h for h, _, _ in layers)),
            float(sum(f for _, _, f in layers))]


def probe_layouts(heads: int, kv_heads: int, ffn: int, count: int) -> dict[str, list[LayerShape]]:
    """Layer layouts that vary each feature independently (so the least-squares fit is well posed)."""
    dense = (heads, kv_heads, ffn)
    group = heads // kv_heads
    half_ffn = max(32, (ffn // 2) // 32 * 32)  # q4_0 rows are blocks of 32: keep FFN widths multiples of 32
    quarter_ffn = max(32, (ffn // 4) // 32 * 32)
    return {
        "dense": [dense] * count,
        f"drop {count // 4} blocks": [dense] * (count - count // 4),
        f"drop {count // 2} blocks": [dense] * (count - count // 2),
        f"ffn {half_ffn}": [(heads, kv_heads, half_ffn)] * count,
        f"ffn {quarter_ffn}, {count // 2} blocks": [(heads, kv_heads, quarter_ffn)] * (count // 2)
        + [dense] * (count - count // 2),
        f"1 of {kv_heads} KV groups": [(group, 1, ffn)] * count,
        # attention-free layers last: llama.cpp sizes some per-model buffers from layer 0's heads
        f"no attention in {count // 2} blocks": [dense] * (count - count // 2) + [(0, 0, ffn)] * (count // 2),
    }


# --- host fingerprint ------------------------------------------------------------------------------
def host_fingerprint(threads: int, runtime_build: dict | None = None) -> dict:
    cpu, flags = "unknown", ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and cpu == "unknown":
                cpu = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = line.split(":", 1)[1].strip()
    except OSError:
        cpu = platform.processor() or platform.machine()
    build = json.dumps(runtime_build or {}, sort_keys=True, default=str)
    return {"cpu": cpu, "cpu_flags_sha": hashlib.sha256(flags.encode()).hexdigest()[:12], "cores": os.cpu_count(),
            "machine": platform.machine(), "node": platform.node(), "threads": threads,
            "runtime_build_sha": hashlib.sha256(build.encode()).hexdigest()[:12]}


def fingerprint_key(fingerprint: dict) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def fingerprint_differences(a: dict, b: dict) -> list[str]:
    return [f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


# --- probe GGUFs cut from the dense file ---------------------------------------------------------------
def _row_bytes_for(tensor, columns: int) -> int:
    """Bytes of the first ``columns`` values of each row of a (possibly quantized) GGUF tensor."""
    import gguf

    block, type_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]
    if columns % block:
        raise EdgePruneError(f"{tensor.name}: {columns} columns is not a multiple of its {block}-value blocks")
    return columns // block * type_bytes


def _copied_fields(reader, arch: str) -> list[tuple]:
    """The source's metadata other than the architecture's own keys (tokenizer, names), decoded once."""
    import gguf

    skip = {"general.architecture", "GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    out = []
    for name, fld in reader.fields.items():
        if name in skip or name.startswith(f"{arch}."):
            continue
        vtype = fld.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            sub = fld.types[-1]
            value = ([bytes(fld.parts[i]).decode("utf-8") for i in fld.data] if sub == gguf.GGUFValueType.STRING
                     else np.concatenate([fld.parts[i] for i in fld.data]).tolist() if fld.data else [])
            out.append((name, value, vtype, sub))
        elif vtype == gguf.GGUFValueType.STRING:
            out.append((name, bytes(fld.parts[-1]).decode("utf-8"), vtype, None))
        else:
            out.append((name, fld.parts[-1][0].item(), vtype, None))
    return out


def write_probe_ggufs(source: Path, outputs: dict[Path, Sequence[LayerShape]],
                      blocks: dict[Path, Sequence[int]] | None = None) -> None:
    """For each output, a ``deci`` GGUF with its layers (query heads, KV heads, FFN width per layer; 0 heads
    = no attention sublayer) cut from the first heads / neurons of the dense ``llama`` GGUF ``source``'s
    blocks ``blocks[out]`` (default: its first ones). The weights are the dense ones sliced, bit for bit:
    probes only need the shapes; with whole blocks or whole sublayers removed (full widths kept) the file is
    the depth-pruned model itself, quantized exactly as the dense file."""
    import gguf

    reader = gguf.GGUFReader(str(source))
    arch = bytes(reader.fields["general.architecture"].parts[-1]).decode("utf-8")
    if arch != "llama":
        raise EdgePruneError(f"{source}: cost-model probes are cut from a dense llama GGUF (this is {arch})")

    def scalar(key: str):
        return reader.fields[f"{arch}.{key}"].parts[-1][0]

    count, dense_heads = int(scalar("block_count")), int(scalar("attention.head_count"))
    head_dim = int(scalar("embedding_length")) // dense_heads
    copied = _copied_fields(reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    for out, layers in outputs.items():
        if any(h > dense_heads or f > int(scalar("feed_forward_length")) for h, _, f in layers) or len(layers) > count:
            raise EdgePruneError("a probe layout is larger than the dense model")
        writer = gguf.GGUFWriter(str(out), "deci")
        for name, value, vtype, sub in copied:
            writer.add_key_value(name, value, vtype, sub_type=sub)
        for key in ("context_length", "embedding_length", "rope.dimension_count", "rope.freq_base",
                    "attention.layer_norm_rms_epsilon", "vocab_size"):
            if f"{arch}.{key}" in reader.fields:
                writer.add_key_value(f"deci.{key}", scalar(key).item(), reader.fields[f"{arch}.{key}"].types[0])
        writer.add_block_count(len(layers))
        writer.add_head_count([h for h, _, _ in layers])
        writer.add_head_count_kv([k for _, k, _ in layers])
        writer.add_feed_forward_length([f for _, _, f in layers])
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
        for name, t in tensors.items():
            if not name.startswith("blk."):
                writer.add_tensor(name, np.asarray(t.data), raw_dtype=t.tensor_type)
        sources = list((blocks or {}).get(out) or range(len(layers)))
        if len(sources) != len(layers) or len(set(sources)) != len(sources) or not all(0 <= b < count for b in sources):
            raise EdgePruneError(f"{out.name}: source blocks {sources} do not name {len(layers)} distinct blocks of {count}")
        for i, ((heads, kv, ffn), src) in enumerate(zip(layers, sources)):
            pick = {"attn_norm": (None, None), "attn_q": (heads * head_dim, None), "attn_k": (kv * head_dim, None),
                    "attn_v": (kv * head_dim, None), "attn_output": (None, heads * head_dim),
                    "ffn_norm": (None, None), "ffn_gate": (ffn, None), "ffn_up": (ffn, None), "ffn_down": (None, ffn)}
            for part, (rows, columns) in pick.items():
                if (part.startswith("attn") and not heads) or (part.startswith("ffn") and not ffn):
                    continue  # deci: a layer with 0 heads (0 FFN width) has no such sublayer at all
                t = tensors[f"blk.{src}.{part}.weight"]
                data = np.asarray(t.data)
                if rows is not None:
                    data = data[:rows]
                if columns is not None:
                    data = data[:, :_row_bytes_for(t, columns)] if data.dtype == np.uint8 else data[:, :columns]
                writer.add_tensor(f"blk.{i}.{part}.weight", np.ascontiguousarray(data), raw_dtype=t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()


def cut_gguf(source: Path, out: Path, drop_blocks: Sequence[int] = (), drop_attention: Sequence[int] = ()) -> Path:
    """The dense llama GGUF ``source`` with whole blocks and attention sublayers removed (source block
    indices), its remaining tensors copied unchanged: a depth-pruned model without re-quantizing. Written
    as ``deci`` (llama.cpp reads per-layer head counts there; 0 = attention-free)."""
    heads, kv, ffn, count = dense_layout(source)
    drop, attn = set(drop_blocks), set(drop_attention)
    if not drop.isdisjoint(attn) or not all(0 <= b < count for b in drop | attn) or len(drop) >= count:
        raise EdgePruneError(f"cut {sorted(drop)} / attention {sorted(attn)}: blocks must be distinct, in 0..{count - 1}, "
                             "and leave at least one block")
    kept = [b for b in range(count) if b not in drop]
    if kept[0] in attn:
        raise EdgePruneError(f"block {kept[0]} is the first kept block: llama.cpp reads the head size from it, keep its attention")
    layers = [(0, 0, ffn) if b in attn else (heads, kv, ffn) for b in kept]
    tmp = Path(out).with_name(Path(out).name + ".tmp")
    write_probe_ggufs(source, {tmp: layers}, {tmp: kept})
    os.replace(tmp, out)
    return Path(out)


def prepare_probes(source: Path, directory: Path | None = None) -> dict[str, tuple[Path, list[LayerShape]]]:
    """The probe GGUFs of ``source`` (written once, kept in the cache beside the cost models)."""
    from edgeprune.core.paths import cache_dir

    heads, kv, ffn, count = dense_layout(source)
    layouts = probe_layouts(heads, kv, ffn, count)
    stat = Path(source).stat()
    tag = hashlib.sha256(f"{Path(source).resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    directory = Path(directory or Path(cache_dir()) / "cost-models" / "probes" / tag)
    index = directory / "probes.json"
    paths = {name: directory / f"probe{i}.gguf" for i, name in enumerate(layouts)}
    if not (index.is_file() and json.loads(index.read_text()) == {n: list(map(list, l)) for n, l in layouts.items()}
            and all(p.is_file() for p in paths.values())):
        directory.mkdir(parents=True, exist_ok=True)
        staged = {p.with_name(p.name + ".tmp"): layouts[n] for n, p in paths.items()}
        write_probe_ggufs(source, staged)
        for tmp in staged:
            os.replace(tmp, tmp.with_name(tmp.name[:-4]))
        index.write_text(json.dumps({n: list(map(list, l)) for n, l in layouts.items()}))
    return {name: (paths[name], layouts[name]) for name in layouts}


def dense_layout(source: Path) -> tuple[int, int, int, int]:
    """(query heads, KV heads, FFN width, layers) of a dense llama GGUF."""
    layers = gguf_layers(source)
    heads, kv_heads, ffn = layers[0]
    return heads, kv_heads, ffn, len(layers)


# --- the model --------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostModel:
    """Seconds per prefill of ``prompt`` tokens and per decode step, linear in ``FEATURES``."""

    runtime: str
    prompt: int
    threads: int
    prefill_coef: tuple[float, ...]
    decode_coef: tuple[float, ...]
    fingerprint: dict
    probes: list = field(default_factory=list)  # per probe: name, features, measured and fitted seconds
    measured_at: str = ""
    source: str = ""
    load_average: list = field(default_factory=list)

    def predict(self, layers: Sequence[LayerShape]) -> dict[str, float]:
        x = np.asarray(features(layers))
        return {"prefill_s": float(x @ np.asarray(self.prefill_coef)),
                "decode_s": float(x @ np.asarray(self.decode_coef))}

    def speedup(self, layers: Sequence[LayerShape], dense: Sequence[LayerShape]) -> dict[str, float]:
        a, b = self.predict(layers), self.predict(dense)
        return {"prefill": b["prefill_s"] / a["prefill_s"], "decode": b["decode_s"] / a["decode_s"]}

    def per_unit(self) -> dict[str, dict[str, float]]:
        """Milliseconds each unit costs (what removing one saves)."""
        return {"prefill_ms": {n: round(c * 1e3, 5) for n, c in zip(FEATURES, self.prefill_coef)},
                "decode_ms": {n: round(c * 1e3, 5) for n, c in zip(FEATURES, self.decode_coef)}}

    def fit_error(self) -> dict[str, float]:
        """Largest relative error of the fit on its own probes."""
        out = {}
        for kind in ("prefill", "decode"):
            errors = [abs(p[f"{kind}_fit_s"] / p[f"{kind}_s"] - 1) for p in self.probes]
            out[kind] = max(errors) if errors else float("nan")
        return out

    def to_dict(self) -> dict:
        return {"format": FORMAT, "runtime": self.runtime, "prompt": self.prompt, "threads": self.threads,
                "features": list(FEATURES), "prefill_coef": list(self.prefill_coef),
                "decode_coef": list(self.decode_coef), "fingerprint": self.fingerprint, "probes": self.probes,
                "measured_at": self.measured_at, "source": self.source, "load_average": self.load_average,
                "per_unit": self.per_unit(), "fit_max_rel_error": self.fit_error()}

    @classmethod
    def from_dict(cls, data: dict) -> "CostModel":
        if data.get("format") != FORMAT or tuple(data.get("features", ())) != FEATURES:
            raise EdgePruneError("cost model file has another format; measure again (edgeprune cost measure)")
        return cls(data["runtime"], data["prompt"], data["threads"], tuple(data["prefill_coef"]),
                   tuple(data["decode_coef"]), data["fingerprint"], data.get("probes", []),
                   data.get("measured_at", ""), data.get("source", ""), data.get("load_average", []))


def fit(rows: list[dict]) -> tuple[tuple[float, ...], tuple[float, ...], list[dict]]:
    x = np.asarray([r["features"] for r in rows])
    coefs = []
    for kind in ("prefill", "decode"):
        y = np.asarray([r[f"{kind}_s"] for r in rows])
        coef = np.linalg.lstsq(x, y, rcond=None)[0]
        for r, fitted in zip(rows, x @ coef):
            r[f"{kind}_fit_s"] = float(fitted)
        coefs.append(tuple(float(c) for c in coef))
    return coefs[0], coefs[1], rows


def time_sessions(paths: dict[str, Path], threads: int, prompt: int, new_tokens: int, rounds: int,
                  progress: bool = True) -> dict[str, dict]:
    """Median prefill seconds and median per-step decode seconds per model, rounds interleaved (the order
    rotates every round), through the in-process llama.cpp session ``edgeprune bench`` uses."""
    from tqdm.auto import tqdm

    from edgeprune.runtime.base import get_runtime

    runtime = get_runtime("llamacpp")
    sessions = {name: runtime.load(str(path), threads=threads, n_ctx=prompt + new_tokens + 8)
                for name, path in paths.items()}
    rng = np.random.default_rng(0)
    ids = rng.integers(3, 300, size=(1, prompt))  # any ids in every vocabulary: the content does not change the time
    names = list(sessions)
    samples = {n: {"prefill": [], "decode": []} for n in names}
    try:
        for name in names:  # warm-up, untimed
            sessions[name].decode_timings(ids, 4)
        for r in tqdm(range(rounds), desc="cost probes", disable=not progress):
            for name in names[r % len(names):] + names[:r % len(names)]:
                prefill, steps, _ = sessions[name].decode_timings(ids, new_tokens)
                samples[name]["prefill"].append(prefill)
                samples[name]["decode"].append(statistics.median(steps))
    finally:
        for s in sessions.values():
            s.close()
    return {n: {"prefill_s": statistics.median(v["prefill"]), "decode_s": statistics.median(v["decode"]),
                "prefill_rounds": v["prefill"], "decode_rounds": v["decode"]} for n, v in samples.items()}


def measure(source: Path, threads: int = 2, prompt: int = 128, new_tokens: int = 32, rounds: int = 5,
            progress: bool = True) -> CostModel:
    """Time the probe GGUFs cut from ``source`` (a dense llama GGUF, ideally the quantization you deploy)
    interleaved and fit the cost model."""
    from edgeprune.runtime.llamacpp_adapter import build_flags

    probes = prepare_probes(source)
    load_before = list(os.getloadavg())
    timed = time_sessions({n: p for n, (p, _) in probes.items()}, threads, prompt, new_tokens, rounds, progress)
    rows = [dict(name=n, layers=len(l), features=features(l), **timed[n]) for n, (_, l) in probes.items()]
    prefill, decode, rows = fit(rows)
    return CostModel("llamacpp", prompt, threads, prefill, decode, host_fingerprint(threads, build_flags()), rows,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), str(source),
                     [round(v, 2) for v in load_before + list(os.getloadavg())])


def cache_file(fingerprint: dict, source: Path, prompt: int) -> Path:
    from edgeprune.core.paths import cache_dir

    tag = hashlib.sha256(f"{Path(source).resolve()}:{Path(source).stat().st_size}:{prompt}".encode()).hexdigest()[:10]
    return Path(cache_dir()) / "cost-models" / f"llamacpp-{fingerprint_key(fingerprint)}-{tag}.json"


def save(model: CostModel, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(model.to_dict(), indent=1))
    os.replace(tmp, path)
    return path


def load_or_measure(source: Path, threads: int = 2, prompt: int = 128, path: Path | None = None,
                    remeasure: bool = False, reuse_foreign: bool = True, progress: bool = True,
                    **measure_options) -> tuple[CostModel, Path, str]:
    """The cached cost model of this host (or the file ``path``), measured when absent. A model whose
    fingerprint differs from this host's warns and is measured again (``reuse_foreign=False``: refused).
    Returns the model, its file and how it was obtained (``cached`` / ``measured`` / ``re-measured``)."""
    from edgeprune.runtime.llamacpp_adapter import build_flags

    here = host_fingerprint(threads, build_flags())
    path = Path(path) if path else cache_file(here, source, prompt)
    how = "measured"
    if path.is_file() and not remeasure:
        model = read_cost_model(path, "; delete it or pass --remeasure")
        diff = fingerprint_differences(model.fingerprint, here)
        if not diff and model.prompt == prompt:
            return model, path, "cached"
        if not reuse_foreign:
            raise EdgePruneError(f"{path}: cost model measured on another host or setting ({'; '.join(diff)}); "
                                 "measure it here (edgeprune cost measure)")
        print(f"edgeprune: warning: {path} was measured on another host or setting ({'; '.join(diff) or 'prompt'}); "
              "measuring again on this host", file=sys.stderr)
        how = "re-measured"
        if path.parent != cache_file(here, source, prompt).parent:  # a user's file: keep it, cache the new one
            path = cache_file(here, source, prompt)
    model = measure(source, threads=threads, prompt=prompt, progress=progress, **measure_options)
    save(model, path)
    return model, path, how


def read_cost_model(path: Path, advice: str = "") -> CostModel:
    """A saved cost model file, or one error line naming what is wrong with it."""
    try:
        return CostModel.from_dict(json.loads(path.read_text()))
    except (ValueError, KeyError, TypeError) as exc:
        raise EdgePruneError(f"{path}: not a readable cost model ({exc}){advice}") from None


def load_cost_model(path: str | Path, threads: int | None = None) -> CostModel:
    """A saved cost model (``edgeprune cost measure`` / ``show`` print its file) for planning. One measured on
    another host or llama.cpp build prices units for that host: warned, never used silently."""
    path = Path(path)
    if not path.is_file():
        raise EdgePruneError(f"cost model {path}: no such file (measure one: edgeprune cost measure --model DENSE.gguf)")
    model = read_cost_model(path)
    try:
        from edgeprune.runtime.llamacpp_adapter import build_flags

        here = host_fingerprint(threads or model.threads, build_flags())
    except Exception:  # llama.cpp not installed here: compare the host without its build
        here = dict(host_fingerprint(threads or model.threads), runtime_build_sha=model.fingerprint.get("runtime_build_sha"))
    diff = fingerprint_differences(model.fingerprint, here)
    if diff:
        print(f"edgeprune: warning: cost model {path} was measured on another host or build ({'; '.join(diff)}); "
              "its prices may not hold here (edgeprune cost measure re-measures)", file=sys.stderr)
    return model


def gguf_file_type(path: Path) -> int | None:
    """``general.file_type`` (llama.cpp's LLAMA_FTYPE: 2 = Q4_0, 7 = Q8_0, 3 = Q4_1), None when absent."""
    from edgeprune.core.ggufio import read_gguf_metadata

    field = read_gguf_metadata(path).get("general.file_type")
    return int(field[0]) if field is not None else None


def gguf_layers(path: Path) -> list[LayerShape]:
    """The per-layer (query heads, KV heads, FFN width) of any llama / deci GGUF (header only: the project's
    own parser, since gguf.GGUFReader takes minutes on a 50k-token vocabulary)."""
    from edgeprune.core.ggufio import read_gguf_metadata

    fields = read_gguf_metadata(path)
    arch = fields["general.architecture"][0]
    count = int(fields[f"{arch}.block_count"][0])

    def per_layer(key: str) -> list[int]:
        value = fields[f"{arch}.{key}"][0]
        values = [int(v) for v in value] if isinstance(value, list) else [int(value)] * count
        return values if len(values) == count else values * count

    return list(zip(per_layer("attention.head_count"), per_layer("attention.head_count_kv"),
                    per_layer("feed_forward_length")))


def plan_removals(cost: CostModel, dense: Sequence[LayerShape], block_scores: Sequence[float],
                  attention_scores: Sequence[float] | None = None, decode_speedup: float | None = None,
                  prefill_speedup: float | None = None, keep: Sequence[int] = ()) -> dict:
    """Whole blocks and attention sublayers to remove, chosen greedily by importance lost per millisecond
    of decode time the cost model says each saves (so a unit that is cheap in FLOPs but expensive in
    per-layer overhead is priced as llama.cpp runs it), until the predicted speedups reach the targets.
    ``block_scores`` / ``attention_scores``: importance per block (e.g. Block Influence; lower = safer to
    remove); ``keep``: blocks never touched (default: the first and the last)."""
    if decode_speedup is None and prefill_speedup is None:
        raise EdgePruneError("plan_removals needs a decode or prefill speedup target")
    n = len(dense)
    protected = set(keep) if keep else {0, n - 1}
    drop: set[int] = set()
    attention: set[int] = set()

    def layout() -> list[LayerShape]:
        return [(0, 0, f) if i in attention else (h, k, f) for i, (h, k, f) in enumerate(dense) if i not in drop]

    def reached() -> bool:
        s = cost.speedup(layout(), dense)
        return (decode_speedup is None or s["decode"] >= decode_speedup) and \
            (prefill_speedup is None or s["prefill"] >= prefill_speedup)

    base = cost.predict(dense)["decode_s"]
    while not reached():
        now = cost.predict(layout())["decode_s"]
        options = []
        for i in range(n):
            if i in protected or i in drop:
                continue
            saved_block = now - cost.predict([(0, 0, f) if j in attention else (h, k, f)
                                              for j, (h, k, f) in enumerate(dense) if j not in drop and j != i])["decode_s"]
            lost = max(float(block_scores[i]) - (float(attention_scores[i]) if attention_scores is not None and i in attention else 0.0), 1e-9)
            options.append((lost / max(saved_block, 1e-12), "block", i))
            if attention_scores is not None and i not in attention and i != min(set(range(n)) - drop):
                saved_attention = now - cost.predict([(0, 0, f) if (j in attention or j == i) else (h, k, f)
                                                      for j, (h, k, f) in enumerate(dense) if j not in drop])["decode_s"]
                options.append((max(float(attention_scores[i]), 1e-9) / max(saved_attention, 1e-12), "attention", i))
        if not options:
            raise EdgePruneError("the speedup target cannot be reached by removing blocks and attention sublayers "
                                 f"(predicted {base / now:.2f}x at most)")
        _, kind, i = min(options)
        if kind == "block":
            drop.add(i)
            attention.discard(i)
        else:
            attention.add(i)
    return {"drop_blocks": sorted(drop), "drop_attention": sorted(attention),
            "predicted": cost.speedup(layout(), dense), "layers": layout()}
