"""Readers for the evaluation/calibration data formats (STS-B tsv, plain text such as WikiText-2)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from edgeprune.core.errors import EdgePruneError


@dataclass(frozen=True)
class STSPair:
    sentence1: str
    sentence2: str
    score: float


def read_text(path: str | Path) -> str:
    path = Path(path)
    if not path.exists():
        raise EdgePruneError(f"data file not found: {path}")
    if not path.is_file():
        raise EdgePruneError(f"data path is not a file: {path}")
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise EdgePruneError(f"cannot read data file {path}: {exc.__class__.__name__}: {exc}") from None


def _is_sts_row(line: str) -> bool:
    return line.count("\t") >= 6  # genre, file, year, id, score, sentence1, sentence2


def is_sts_file(path: str | Path) -> bool:
    """Whether a data file is STS-B tsv (judged by its first non-empty line); False for a missing file."""
    location = Path(str(path)).expanduser()
    if not location.is_file():
        return False
    with open(location, encoding="utf-8", errors="replace") as handle:
        return _is_sts_row(next((line for line in handle if line.strip()), ""))


def read_sts(path: str | Path, limit: int | None = None) -> list[STSPair]:
    """STS-B tsv: genre, file, year, id, score, sentence1, sentence2[, extra...]. Split on tabs only:
    sentences contain quote characters, so a CSV reader would mangle them."""
    pairs = []
    for number, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        cols = line.split("\t")
        try:
            pairs.append(STSPair(cols[5], cols[6], float(cols[4])))
        except (IndexError, ValueError):
            raise EdgePruneError(f"{path}:{number}: not an STS-B row (need score in column 5 and two sentences)") from None
        if limit and len(pairs) >= limit:
            break
    if not pairs:
        raise EdgePruneError(f"{path}: no STS-B rows found")
    return pairs


def read_sentences(path: str | Path, limit: int | None = None) -> list[str]:
    """Calibration sentences: both sides of an STS file, or the non-empty lines of a text file."""
    text = read_text(path)
    first = next((line for line in text.splitlines() if line.strip()), "")
    if _is_sts_row(first):
        sentences = [s for pair in read_sts(path) for s in (pair.sentence1, pair.sentence2)]
    else:
        sentences = [line.strip() for line in text.splitlines() if len(line.strip()) > 20]
    if not sentences:
        raise EdgePruneError(f"{path}: no sentences found")
    return sentences[:limit] if limit else sentences


def read_corpus(path: str | Path) -> str:
    text = read_text(path)
    if not text.strip():
        raise EdgePruneError(f"{path}: empty text file")
    return text


def token_windows(tokenizer, path: str | Path, length: int, count: int):
    """Up to ``count`` windows of ``length`` tokens of the sentences of ``path`` run together (newline
    separated; only as much text is tokenized as the windows need), as an int64 array [windows, length]."""
    import numpy as np

    sentences, ids = read_sentences(path), []
    for start in range(0, len(sentences), 512):
        ids += tokenizer("\n".join(sentences[start:start + 512]) + "\n", add_special_tokens=False)["input_ids"]
        if len(ids) >= length * count:
            break
    windows = min(len(ids) // length, count)
    if windows < 1:
        raise EdgePruneError(f"{path}: {len(ids)} tokens, calibration needs at least {length}")
    return np.asarray(ids[:windows * length], dtype=np.int64).reshape(windows, length)
