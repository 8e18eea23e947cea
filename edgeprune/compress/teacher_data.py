"""Teacher-generated distillation data for decoders: text sampled from the dense model itself (LLM-QAT's
data-free recipe), so healing is not limited to the small corpus that quality is also scored near.

Each sequence starts at the document separator the model was pre-trained with (``<|endoftext|>``; else BOS)
and is sampled token by token from the dense model's own distribution (temperature ``temperature``, no
top-k/top-p; special tokens suppressed, so every sequence is plain text of its full length). Sampling is seeded per batch, so the same settings give the same tokens.
The tokens are cached under ``$EDGEPRUNE_CACHE/teacher-data`` keyed by the model's identity and every
setting; a second run with the same key reads the cache instead of generating again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np

from edgeprune.core.errors import EdgePruneError

TEACHER_DATA = "teacher"  # the --finetune value that selects teacher-generated data
CACHE_FORMAT = 1
DOCUMENT_SEPARATOR = "<|endoftext|>"


def model_identity(model, source=None) -> str:
    """What the cache key names the teacher by: its source (path, kind), size and first weights (cheap)."""
    source = source.to_dict() if hasattr(source, "to_dict") else {"source": str(source)}
    params = sum(p.numel() for p in model.parameters())
    first = next(model.parameters()).detach().reshape(-1)[:4096].float().numpy().tobytes()
    digest = hashlib.sha256(json.dumps(source, sort_keys=True, default=str).encode() + first).hexdigest()[:16]
    return f"{digest}-{params}"


def cache_path(identity: str, sequences: int, length: int, temperature: float, seed: int) -> Path:
    from edgeprune.core.paths import cache_dir

    key = hashlib.sha256(json.dumps([CACHE_FORMAT, identity, sequences, length, temperature, seed]).encode())
    return Path(cache_dir()) / "teacher-data" / f"{key.hexdigest()[:20]}.npy"


def generate_tokens(model, start_id: int, suppress_ids: list[int], sequences: int, length: int,
                    temperature: float = 1.0, seed: int = 0, batch_size: int = 32, progress: bool = True) -> np.ndarray:
    """[sequences, length] int32 token ids sampled from ``model`` (a causal LM) with its KV cache."""
    import torch
    from tqdm.auto import tqdm

    out = np.empty((sequences, length), dtype=np.int32)
    bar = tqdm(total=sequences * length, desc="teacher data", unit="tok", disable=not progress)
    with torch.inference_mode():
        for start in range(0, sequences, batch_size):
            rows = min(batch_size, sequences - start)
            generator = torch.Generator().manual_seed(seed * 1_000_003 + start)
            ids = torch.full((rows, 1), start_id, dtype=torch.long)
            tokens, past = [ids], None
            for _ in range(length - 1):
                result = model(input_ids=ids, past_key_values=past, use_cache=True)
                past = result.past_key_values
                logits = result.logits[:, -1].float() / temperature
                if suppress_ids:
                    logits[:, suppress_ids] = float("-inf")
                ids = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator)
                tokens.append(ids)
                bar.update(rows)
            out[start:start + rows] = torch.cat(tokens, 1).numpy()
            bar.update(rows)
    bar.close()
    return out


def start_token(tokenizer) -> int | None:
    """The document separator the model was pre-trained with (``<|endoftext|>`` in GPT-2-style vocabularies),
    so samples are documents rather than chat turns; else BOS, else EOS."""
    unk = tokenizer.unk_token_id
    doc = tokenizer.convert_tokens_to_ids(DOCUMENT_SEPARATOR) if DOCUMENT_SEPARATOR in tokenizer.get_vocab() else None
    for candidate in (doc, tokenizer.bos_token_id, tokenizer.eos_token_id):
        if candidate is not None and candidate != unk:
            return int(candidate)
    return None


def teacher_blocks(teacher, tokenizer, source, tokens: int, length: int, temperature: float = 1.0, seed: int = 0,
                   progress: bool = True) -> tuple[list[list[int]], dict]:
    """``tokens`` (rounded up to whole sequences of ``length``) teacher-sampled tokens, from the cache when
    present. Returns the blocks and a record (size, settings, cache file, seconds) for the manifest."""
    if tokens < length:
        raise EdgePruneError(f"teacher-generated data: {tokens} tokens is less than one sequence of {length} "
                             "(raise --teacher-tokens)")
    if temperature <= 0:
        raise EdgePruneError(f"teacher-data temperature must be > 0 (got {temperature})")
    tok = tokenizer
    start_id = start_token(tok)
    if start_id is None:
        raise EdgePruneError("teacher-generated data needs a tokenizer with a BOS or EOS token to start from")
    sequences = -(-tokens // length)
    path = cache_path(model_identity(teacher, source), sequences, length, temperature, seed)
    record = {"sequences": sequences, "length": length, "tokens": sequences * length, "temperature": temperature,
              "seed": seed, "start_token": int(start_id), "cache": str(path)}
    started = time.perf_counter()
    if path.is_file():
        data = np.load(path)
        record["cached"] = True
    else:
        suppress = sorted({int(i) for i in list(tok.all_special_ids) + [tok.eos_token_id, start_id] if i is not None})
        data = generate_tokens(teacher, start_id, suppress, sequences, length, temperature, seed,
                               progress=progress)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as handle:  # np.save on a handle: it would append .npy to a plain name
            np.save(handle, data)
        os.replace(tmp, path)  # a half-written cache is never read back
        record["cached"] = False
    record["seconds"] = round(time.perf_counter() - started, 2)
    return data.tolist(), record
