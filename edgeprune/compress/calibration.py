"""Calibration data: a few hundred unlabeled texts, tokenized into batches for data-aware pruning.

Sources: a built-in data key (``stsb:train``; edgeprune.core.data_sources), an STS-B tsv (both sentences of every pair), a plain text file (non-empty lines; for decoders,
consecutive text is packed into ``max_length`` token windows), a local ``datasets`` data file
(.json/.jsonl/.csv/.parquet/.arrow) or a ``datasets`` name (``name``, ``name:config`` or ``name:config:split``).
Sampling is seeded, so the same recipe always sees the same texts.
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Sequence

from edgeprune.core.errors import EdgePruneError

DATASET_SUFFIXES = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".arrow": "arrow"}
TEXT_COLUMNS = ("text", "sentence", "sentence1", "content", "document", "question")


def _texts_from_dataset(dataset, source: str) -> list[str]:
    columns = list(dataset.column_names)
    column = next((c for c in TEXT_COLUMNS if c in columns), None)
    if column is None:
        column = next((c for c in columns if dataset.features[c].dtype == "string"), None) if hasattr(dataset, "features") else None
    if column is None:
        raise EdgePruneError(f"{source}: no text column (looked for {', '.join(TEXT_COLUMNS)}); columns: {columns}")
    return [t.strip() for t in dataset[column] if isinstance(t, str) and t.strip()]


def _load_datasets(path: str) -> list[str]:
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a dependency
        raise EdgePruneError("calibration from a datasets name needs the `datasets` package") from None
    suffix = Path(path).suffix.lower()
    try:
        if Path(path).is_file():
            if suffix not in DATASET_SUFFIXES:
                raise EdgePruneError(f"{path}: unsupported calibration file type {suffix!r}")
            dataset = datasets.load_dataset(DATASET_SUFFIXES[suffix], data_files=str(path), split="train")
        else:
            name, config, split = (path.split(":") + [None, None])[:3]
            dataset = datasets.load_dataset(name, config or None, split=split or "train")
    except EdgePruneError:
        raise
    except Exception as exc:  # datasets raises many types (offline, missing config, bad file)
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise EdgePruneError(f"cannot load calibration data {path!r}: {first}") from None
    return _texts_from_dataset(dataset, path)


# Fewer calibration texts than this give noisy importance and Gram estimates; the run says so.
MIN_CALIBRATION_TEXTS = 32


def looks_like_path(path: str | Path) -> bool:
    """A name that can only be a file (not a ``datasets`` name), so a missing one is reported as missing."""
    text = str(path)
    return text.startswith((".", "/", "~")) or Path(text).suffix.lower() in (".txt", ".tsv", ".csv", *DATASET_SUFFIXES) \
        or text.count("/") > 1


def load_texts(path: str | Path, what: str = "calibration data", flag: str = "--calib") -> list[str]:
    """All candidate calibration (or fine-tuning) texts of a source (before sampling)."""
    from edgeprune.core.datasets import read_sentences

    from edgeprune.core.data_sources import resolve_data_or_name

    if path is None:
        raise EdgePruneError(f"this importance/reconstruction needs {what}: pass {flag} PATH "
                             f"(e.g. {flag} stsb:train; `edgeprune data list` shows the built-in data sets)")
    path = resolve_data_or_name(path)
    location = Path(str(path)).expanduser()
    if location.is_file() and location.suffix.lower() in DATASET_SUFFIXES and location.suffix.lower() != ".csv":
        return _load_datasets(str(location))
    if location.exists():
        if location.is_dir():
            raise EdgePruneError(f"{what} path is a directory, not a file: {location} ({flag})")
        return read_sentences(location)
    if looks_like_path(path):
        raise EdgePruneError(f"{what} not found: {path} ({flag})")
    return _load_datasets(str(path))


def calibration_record(batches: list[dict], cfg) -> dict:
    """What calibration actually used, for the manifest (the recipe only says what was asked for)."""
    used = sum(len(b["input_ids"]) for b in batches)
    tokens = int(sum(int(b["attention_mask"].sum()) for b in batches))
    return {"source": str(cfg.path), "samples_requested": cfg.samples, "samples_used": used, "tokens": tokens,
            "max_length": cfg.max_length}


def warn_if_few(used: int, requested: int, source, log=None) -> None:
    import sys

    if used < min(requested, MIN_CALIBRATION_TEXTS):
        message = (f"edgeprune: warning: calibration used only {used} text(s) from {source} (asked for {requested}); "
                   f"estimates from fewer than {MIN_CALIBRATION_TEXTS} are noisy: give more text")
        (log or (lambda m: print(m, file=sys.stderr, flush=True)))(message)


def sample_texts(texts: Sequence[str], samples: int, seed: int) -> list[str]:
    """``samples`` distinct texts chosen with a seeded RNG (all of them if there are fewer)."""
    unique = list(dict.fromkeys(texts))
    if len(unique) <= samples:
        return unique
    return random.Random(seed).sample(unique, samples)


def _pack(tokenizer, texts: Sequence[str], samples: int, max_length: int, seed: int) -> list[list[int]]:
    """Decoder calibration: concatenate texts and cut ``samples`` full windows of ``max_length`` tokens."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    ids: list[int] = []
    order = list(texts)
    random.Random(seed).shuffle(order)
    for text in order:
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"] + eos)
        if len(ids) >= samples * max_length:
            break
    windows = [ids[i:i + max_length] for i in range(0, len(ids) - max_length + 1, max_length)]
    if not windows:
        raise EdgePruneError(f"calibration text too short for one {max_length}-token window")
    return windows[:samples]


def tokenize_batches(tokenizer, texts: Sequence[str], max_length: int, batch_size: int) -> list[dict]:
    # Sorting by length keeps padding (and wasted compute) small; order does not matter for statistics.
    texts = sorted(texts, key=len)
    batches = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(list(texts[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_length, return_tensors="pt")
        batches.append(dict(batch))
    return batches


def load_calibration(loaded, cfg, seed: int = 0) -> list[dict]:
    """Tokenized calibration batches (dicts of tensors) for ``loaded`` per a ``CalibrationConfig``."""
    import torch

    from edgeprune.core.data_sources import resolve_data_or_name

    path = resolve_data_or_name(cfg.path) if cfg.path is not None else None
    texts = load_texts(path)
    tokenizer = loaded.tokenizer
    if loaded.adapter.is_decoder and not _looks_like_sentences(path):
        windows = _pack(tokenizer, texts, cfg.samples, cfg.max_length, seed)
        return [{"input_ids": torch.tensor(windows[i:i + cfg.batch_size]),
                 "attention_mask": torch.ones(len(windows[i:i + cfg.batch_size]), len(windows[0]), dtype=torch.long)}
                for i in range(0, len(windows), cfg.batch_size)]
    chosen = sample_texts(texts, cfg.samples, seed)
    return tokenize_batches(tokenizer, chosen, cfg.max_length, cfg.batch_size)


def _looks_like_sentences(path) -> bool:
    """STS pairs stay sentence-level even for decoders; everything else is packed for decoders."""
    from edgeprune.core.datasets import is_sts_file

    return is_sts_file(path)

