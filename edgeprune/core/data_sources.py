"""Built-in data sets by short key (``stsb:train``, ``wikitext2:valid``, ``lambada:dev`` ...). Torch-free.

A reference resolves, in order, to:

1. an existing file path (the user's own data, used as given);
2. a copy fetched earlier from the Hugging Face hub, converted to the file format below and kept in the
   edgeprune cache (``$EDGEPRUNE_CACHE/data``);
3. the hub itself through ``datasets`` by name (skipped at once when ``HF_HUB_OFFLINE`` /
   ``HF_DATASETS_OFFLINE`` is set or the hub cannot be reached within a few seconds);
4. a local mirror folder: ``$EDGEPRUNE_DATA``, else ``shared/data`` beside the checkout or the cwd
   (its README lists the same files).

Every source yields the same file format (STS-B tsv, plain text, or jsonl with the fields the task readers
expect) and, for the ``dev`` subsets, the same rows, so a number does not depend on where the data came from.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterable
from urllib.parse import urlparse

from edgeprune.core.errors import EdgePruneError
from edgeprune.core.paths import cache_dir, data_dir

HUB_PROBE_SECONDS = 3.0


@dataclass(frozen=True)
class DataSource:
    key: str  # "name:split"
    hub: str  # datasets hub name
    hub_config: str | None
    hub_split: str
    rows: int | None  # keep the first N rows of the hub split (the mirror's subset), None: all
    mirror: str | None  # path relative to the mirror folder
    convert: str  # name of the row writer in _WRITERS
    suffix: str  # file suffix of the converted file
    description: str


SOURCES: dict[str, DataSource] = {s.key: s for s in (
    DataSource("stsb:train", "sentence-transformers/stsb", None, "train", None, "stsb/sts-train.csv", "sts", ".csv",
            "STS Benchmark train (5,749 pairs)"),
    DataSource("stsb:dev", "sentence-transformers/stsb", None, "validation", None, "stsb/sts-dev.csv", "sts", ".csv",
            "STS Benchmark dev (1,500 pairs)"),
    DataSource("stsb:test", "sentence-transformers/stsb", None, "test", None, None, "sts", ".csv",
            "STS Benchmark test (1,379 pairs)"),
    DataSource("wikitext2:train", "Salesforce/wikitext", "wikitext-2-v1", "train", None, None, "text", ".txt",
            "WikiText-2 train, word-level tokenized"),
    DataSource("wikitext2:valid", "Salesforce/wikitext", "wikitext-2-v1", "validation", None, "wikitext-2/valid.txt",
            "text", ".txt", "WikiText-2 validation, word-level tokenized"),
    DataSource("wikitext2:test", "Salesforce/wikitext", "wikitext-2-v1", "test", None, None, "text", ".txt",
            "WikiText-2 test, word-level tokenized"),
    DataSource("lambada:dev", "EleutherAI/lambada_openai", "default", "test", 2500, "lambada/lambada-dev.jsonl",
            "lambada", ".jsonl", "LAMBADA (OpenAI), first 2,500 of 5,153 test passages"),
    DataSource("lambada:test", "EleutherAI/lambada_openai", "default", "test", None, None, "lambada", ".jsonl",
            "LAMBADA (OpenAI), all 5,153 test passages"),
    DataSource("hellaswag:dev", "Rowan/hellaswag", None, "validation", 5000, "hellaswag/hellaswag-dev.jsonl",
            "hellaswag", ".jsonl", "HellaSwag validation, first 5,000 of 10,042"),
    DataSource("hellaswag:validation", "Rowan/hellaswag", None, "validation", None, None, "hellaswag", ".jsonl",
            "HellaSwag validation, all 10,042"),
    DataSource("piqa:dev", "ybisk/piqa", None, "validation", 900, "piqa/piqa-dev.jsonl", "piqa", ".jsonl",
            "PIQA validation, first 900 of 1,838"),
    DataSource("piqa:validation", "ybisk/piqa", None, "validation", None, None, "piqa", ".jsonl",
            "PIQA validation, all 1,838"),
)}
ALIASES = {"stsb:validation": "stsb:dev", "wikitext2:validation": "wikitext2:valid"}
# What a task is evaluated on when no data is named (edgeprune eval / bench / pipeline).
TASK_DEFAULT_DATA = {"sts": "stsb:dev", "perplexity": "wikitext2:valid", "lambada": "lambada:dev",
                     "hellaswag": "hellaswag:dev", "piqa": "piqa:dev"}


def _clean(text: str) -> str:
    return " ".join(str(text).split())  # the tsv format cannot hold tabs or newlines inside a field


def _write_sts(rows: Iterable[dict], out) -> None:
    for i, row in enumerate(rows):
        # The hub copy scores 0-1; the STS-B files (and the fine-tuning code) use 0-5.
        out.write("\t".join(["hub", "stsb", "-", str(i), f"{float(row['score']) * 5:.3f}",
                             _clean(row["sentence1"]), _clean(row["sentence2"])]) + "\n")


def _write_text(rows: Iterable[dict], out) -> None:
    for row in rows:
        out.write(row["text"])  # hub rows keep their own newlines: joined they are the original file


def _write_jsonl(fields: Callable[[dict, int], dict]):
    def write(rows: Iterable[dict], out) -> None:
        for i, row in enumerate(rows):
            out.write(json.dumps(fields(row, i), ensure_ascii=False) + "\n")
    return write


_WRITERS = {
    "sts": _write_sts,
    "text": _write_text,
    "lambada": _write_jsonl(lambda row, i: {"text": row["text"]}),
    "hellaswag": _write_jsonl(lambda row, i: {"idx": int(row.get("ind", i)), "activity_label": row["activity_label"],
                                              "ctx": row["ctx"], "endings": list(row["endings"]),
                                              "label": int(row["label"])}),
    "piqa": _write_jsonl(lambda row, i: {"goal": row["goal"], "sol1": row["sol1"], "sol2": row["sol2"],
                                         "label": int(row["label"])}),
}


def canonical_key(ref: str) -> str | None:
    ref = ALIASES.get(ref, ref)
    return ref if ref in SOURCES else None


def is_key(ref: str | os.PathLike) -> bool:
    return isinstance(ref, str) and canonical_key(ref) is not None


def cached_path(source: DataSource) -> Path:
    return cache_dir() / "data" / (source.key.replace(":", "-") + source.suffix)


def hub_offline() -> bool:
    return any(os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")
               for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))


@lru_cache(maxsize=None)
def _hub_reachable(endpoint: str) -> bool:
    # datasets retries an unreachable hub for ~25 s; one short connect tells the same at once.
    url = urlparse(endpoint)
    try:
        socket.create_connection((url.hostname, url.port or (443 if url.scheme == "https" else 80)),
                                 timeout=HUB_PROBE_SECONDS).close()
        return True
    except OSError:
        return False


def hub_reachable() -> bool:
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    return _hub_reachable(endpoint)


def fetch_from_hub(source: DataSource, destination: Path) -> Path:
    """Download ``source`` with ``datasets`` and write it in its file format at ``destination`` (atomically)."""
    import datasets

    args = (source.hub, source.hub_config) if source.hub_config else (source.hub,)
    split = f"{source.hub_split}[:{source.rows}]" if source.rows else source.hub_split
    rows = datasets.load_dataset(*args, split=split)
    destination.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            _WRITERS[source.convert](rows, out)
        os.replace(tmp, destination)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return destination


def _not_found(source: DataSource, hub_note: str) -> EdgePruneError:
    if not source.mirror:
        mirror = "not in the mirror (hub only)"
    elif os.environ.get("EDGEPRUNE_DATA") or data_dir().is_dir():
        mirror = f"no mirror copy at {data_dir() / source.mirror}"
    else:
        mirror = "no mirror folder (EDGEPRUNE_DATA unset, no shared/data beside the checkout or the cwd)"
    return EdgePruneError(
        f"data set {source.key} ({source.description}) not available: {hub_note}; {mirror}; "
        f"pass a local file instead, or set EDGEPRUNE_DATA to a folder holding {source.mirror or source.key}")


def resolve_data(ref: str | os.PathLike, *, use_hub: bool = True) -> Path:
    """A local file path for ``ref``: a file path, a built-in key (``edgeprune recipes``/README list them) or,
    for older recipes, a path relative to the mirror folder. One clear error when none is there."""
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_file():
        return path
    if path.exists():
        raise EdgePruneError(f"data path is not a file: {path}")
    key = canonical_key(text)
    if key is None:
        mirrored = data_dir() / text
        if not path.is_absolute() and mirrored.is_file():
            return mirrored
        known = ", ".join(SOURCES)
        raise EdgePruneError(f"data file not found: {path} (and not a built-in data set: {known})")
    source = SOURCES[key]
    cached = cached_path(source)
    if cached.is_file():
        return cached
    hub_note = f"hub {source.hub} not tried"
    if use_hub:
        if hub_offline():
            hub_note = f"hub {source.hub} skipped (HF_HUB_OFFLINE/HF_DATASETS_OFFLINE set)"
        elif not hub_reachable():
            hub_note = f"hub {source.hub} unreachable (offline?)"
        else:
            try:
                return fetch_from_hub(source, cached)
            except ImportError:
                hub_note = f"hub {source.hub} needs the datasets package (pip install 'edgeprune[full]')"
            except Exception as exc:  # any hub/datasets failure falls through to the mirror
                hub_note = f"hub {source.hub} failed ({exc.__class__.__name__}: {str(exc).splitlines()[0][:160]})"
    if source.mirror:
        mirrored = data_dir() / source.mirror
        if mirrored.is_file():
            return mirrored
    raise _not_found(source, hub_note)


def resolve_data_or_name(ref: str | os.PathLike) -> str:
    """For readers that also accept a ``datasets`` name (calibration, fine-tuning): a file, a built-in key or
    a mirror-relative path resolves to a local file; anything else is returned as given, for ``datasets``."""
    text = str(ref)
    if is_key(text) or Path(text).expanduser().exists() or (not Path(text).is_absolute()
                                                            and (data_dir() / text).is_file()):
        return str(resolve_data(text))
    return text


def where(source: DataSource) -> str:
    """Where ``source`` resolves right now, without downloading (for ``edgeprune data list``)."""
    if cached_path(source).is_file():
        return f"cache {cached_path(source)}"
    if source.mirror and (data_dir() / source.mirror).is_file():
        mirror_note = f"mirror {data_dir() / source.mirror}"
    else:
        mirror_note = None
    if not hub_offline() and hub_reachable():
        return f"hub (downloads on first use into {cached_path(source).parent})"
    return mirror_note or "not available (offline and no mirror copy)"


def describe_sources() -> list[dict[str, str]]:
    """One row per built-in data set, for ``--help`` texts and listings."""
    return [{"key": s.key, "hub": s.hub + (f" ({s.hub_config})" if s.hub_config else "") + f" {s.hub_split}"
             + (f"[:{s.rows}]" if s.rows else ""), "mirror": s.mirror or "-", "description": s.description}
            for s in SOURCES.values()]
