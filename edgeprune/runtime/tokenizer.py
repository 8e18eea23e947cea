"""The export directory's tokenizer through the ``tokenizers`` library alone (no transformers, no torch).

Reads tokenizer.json for the model, and tokenizer_config.json / special_tokens_map.json for the special
tokens, padding side and maximum length, mirroring what ``transformers.AutoTokenizer`` would do for the
same files (``tests/runtime`` checks the parity).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeprune.core.errors import EdgePruneError

SPECIAL_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token", "cls_token", "sep_token", "mask_token")


def _token_text(value) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise EdgePruneError(f"{path}: invalid JSON ({exc})") from None


def model_directory(model_path: str | os.PathLike) -> Path:
    """The directory holding tokenizer/config files for an export dir or a .onnx file inside one."""
    path = Path(model_path)
    return path.parent if path.is_file() else path


@dataclass
class Batch:
    input_ids: np.ndarray  # [B, L] int64
    attention_mask: np.ndarray  # [B, L] int64
    token_type_ids: np.ndarray  # [B, L] int64


class RuntimeTokenizer:
    """Encode/decode with padding and truncation; special tokens as the transformers config declares."""

    def __init__(self, directory: str | os.PathLike):
        from tokenizers import Tokenizer

        directory = model_directory(directory)
        path = directory / "tokenizer.json"
        if not path.is_file():
            raise EdgePruneError(f"{directory}: no tokenizer.json (the export must include the fast tokenizer files)")
        try:
            self._tok = Tokenizer.from_file(str(path))
        except Exception as exc:
            raise EdgePruneError(f"{path}: cannot load tokenizer ({str(exc).splitlines()[0]})") from None
        # We pad and truncate ourselves per call; the file's own fixed padding would override the batch shape.
        self._tok.no_padding()
        self._tok.no_truncation()
        config = _read_json(directory / "tokenizer_config.json")
        special_map = _read_json(directory / "special_tokens_map.json")
        model_config = _read_json(directory / "config.json")
        self.special_tokens: dict[str, str] = {}
        for key in SPECIAL_KEYS:
            text = _token_text(config.get(key)) or _token_text(special_map.get(key))
            if text is not None:
                self.special_tokens[key] = text
        # Decoders often have no pad token; EOS stands in, as edgeprune.core.loading.prepare_tokenizer does.
        if "pad_token" not in self.special_tokens and "eos_token" in self.special_tokens:
            self.special_tokens["pad_token"] = self.special_tokens["eos_token"]
        self.padding_side = config.get("padding_side", "right")
        max_len = config.get("model_max_length")
        self.model_max_length = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e9 else None
        self.clean_up_spaces = bool(config.get("clean_up_tokenization_spaces", False))
        self.pad_id = self.token_id("pad_token")
        if self.pad_id is None:
            self.pad_id = model_config.get("pad_token_id") if isinstance(model_config.get("pad_token_id"), int) else 0
        eos = model_config.get("eos_token_id")
        eos_ids = set(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else [])
        if self.token_id("eos_token") is not None:
            eos_ids.add(self.token_id("eos_token"))
        self.eos_ids = sorted(eos_ids)

    def token_id(self, key: str) -> int | None:
        text = self.special_tokens.get(key)
        return None if text is None else self._tok.token_to_id(text)

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def __call__(self, texts: list[str], max_length: int | None = None, add_special_tokens: bool = True,
                 pad_to_multiple_of: int | None = None) -> Batch:
        """Tokenize a batch: truncate to ``max_length`` (special tokens kept), pad to the longest."""
        if isinstance(texts, str):
            texts = [texts]
        if not texts:
            raise EdgePruneError("no texts to tokenize")
        limit = max_length or self.model_max_length
        if limit:
            self._tok.enable_truncation(int(limit))
        try:
            encodings = self._tok.encode_batch(list(texts), add_special_tokens=add_special_tokens)
        finally:
            self._tok.no_truncation()
        length = max(len(e.ids) for e in encodings)
        if pad_to_multiple_of:
            length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
            if limit:
                length = min(length, max(int(limit), max(len(e.ids) for e in encodings)))
        ids = np.full((len(encodings), length), self.pad_id, dtype=np.int64)
        mask = np.zeros((len(encodings), length), dtype=np.int64)
        types = np.zeros((len(encodings), length), dtype=np.int64)
        for row, enc in enumerate(encodings):
            n = len(enc.ids)
            span = slice(length - n, length) if self.padding_side == "left" else slice(0, n)
            ids[row, span] = enc.ids
            mask[row, span] = 1
            types[row, span] = enc.type_ids
        return Batch(ids, mask, types)

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        text = self._tok.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)
        if self.clean_up_spaces:
            # transformers' clean_up_tokenization, for tokenizers configured with it
            for before, after in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
                                  (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):
                text = text.replace(before, after)
        return text
