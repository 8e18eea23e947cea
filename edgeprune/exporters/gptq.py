"""GPTQ for onnxruntime's ``MatMulNBits``: the math (Hessians of each MatMul's input, error-compensated
rounding, packing) apart from the export that orchestrates it (``quantize.quantize_weight_only``).

onnxruntime ships a GPTQ (``neural_compressor.weight_only.gptq_quantize``), but it re-quantizes GPTQ's
fake-quantized weights with a fresh max-based scale per block, which moves symmetric blocks off the grid GPTQ
rounded them to (a block whose extreme code is -8 gets a scale 16/15 larger), and it needs every MatMul input
of every calibration batch in memory. Here the codes GPTQ chose are packed as they are, and the Hessians are
accumulated batch by batch.

The grid is fitted per block of ``block_size`` weights along K: ``w = s * (q - z)``, ``q`` in 0..15, with an
integer zero point ``z`` packed beside the codes (onnxruntime's fast CPU kernel runs it as fast as its symmetric
form), a float one (rewritten by the export to the fast kernel plus an exact per-block correction), or
onnxruntime's symmetric ``z = 8``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np

from edgeprune.core.errors import EdgePruneError

# Clip ratios tried for each block's range (the extremes times the ratio map to the grid's ends); the error
# weighted by the Hessian's diagonal picks one. 1.0 alone is round-to-nearest's choice.
CLIP_RATIOS = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)


@dataclass(frozen=True)
class GPTQSettings:
    """``damp``: ridge added to the Hessian, as a fraction of its mean diagonal (the GPTQ paper's 1 %).
    ``zero_point``: ``integer`` (a code per block, packed beside the weights: onnxruntime's fast kernel takes
    them at no cost), ``float`` (a dequantized GGUF Q4_1 block is reproduced exactly, but the fast kernel
    needs the rewrite of ``quantize.symmetric_zero_points``, which costs ~40 % per MatMul at decode) or
    ``none`` (onnxruntime's symmetric grid).
    ``clip_search``: fit each block's range over ``CLIP_RATIOS`` instead of taking the block's extremes.
    ``act_order``: quantize the input channels with the largest Hessian diagonal first (the scales are
    then fixed up front from the original weights, "static groups", so every block keeps one scale).
    ``half_grid``: the scale (and a float zero point's offset ``-scale * zero``) rounded to fp16 before any
    code is chosen, as GGUF's block types store them, so the codes are rounded on the grid the file holds."""

    block_size: int = 32
    bits: int = 4
    damp: float = 0.01
    zero_point: str = "float"
    clip_search: bool = True
    act_order: bool = False
    half_grid: bool = False


def accumulate_hessians(session, batches: Iterable[dict], inputs: Sequence[str],
                        masks: Iterable[np.ndarray] | None = None) -> tuple[dict[str, np.ndarray], int]:
    """``sum(x x^T)`` over every real token of every batch for each tensor in ``inputs`` (the MatMuls' left
    operands, added as outputs of ``session``'s graph), in float64; and the number of tokens. ``masks``: one
    [batch, seq] 0/1 array per batch (padding rows do not count); None counts every row."""
    sums: dict[str, np.ndarray] = {}
    tokens = 0
    mask_iter = iter(masks) if masks is not None else None
    for feeds in batches:
        outputs = session.run(list(inputs), feeds)
        mask = next(mask_iter).reshape(-1).astype(bool) if mask_iter is not None else None
        for name, value in zip(inputs, outputs):
            rows = value.reshape(-1, value.shape[-1])
            if mask is not None and rows.shape[0] == mask.shape[0]:
                rows = rows[mask]
            gram = (rows.T @ rows).astype(np.float64)  # float32 GEMM, float64 sums across batches
            if name in sums:
                sums[name] += gram
            else:
                sums[name] = gram
        tokens += int(mask.sum()) if mask is not None else int(np.prod(outputs[0].shape[:-1]))
    if not tokens:
        raise EdgePruneError("GPTQ calibration: no tokens")
    return sums, tokens


def _block_grid(block: np.ndarray, importance: np.ndarray, settings: GPTQSettings) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row of ``block`` [rows, width], so that ``w ≈ scale * (code - zero)``.
    Symmetric (zero point ``none``): the zero is the grid's middle and the signed scale puts the row's
    largest-magnitude weight on code 0, as onnxruntime's own symmetric quantizer does. Otherwise the row's
    range [min, max] spans all the codes and the zero point is a float (a block already on such a grid, e.g. a
    dequantized GGUF Q4_1 block, is reproduced exactly) or rounded to a code. Each clip ratio shrinks that
    range; ``importance`` [width] (the Hessian's diagonal) weights each weight's rounding error in choosing one."""
    half = 1 << (settings.bits - 1)
    top = 2 * half - 1
    if settings.zero_point == "none":
        extreme = block[np.arange(block.shape[0]), np.abs(block).argmax(axis=1)]
        low, high = extreme, np.zeros_like(extreme)
    else:
        low, high = block.min(axis=1), block.max(axis=1)
    best_scale = best_zero = best_error = None
    for ratio in (CLIP_RATIOS if settings.clip_search else (1.0,)):
        if settings.zero_point == "none":
            scale = np.where(low == 0, 1.0, low * ratio / -half)
            zero = np.full_like(scale, float(half))
        else:
            span, middle = (high - low) * ratio, (high + low) / 2  # shrink the range about its middle
            scale = np.where(span == 0, np.maximum(np.abs(middle), 1e-12) / half, span / top)
            zero = (span / 2 - middle) / scale
            if settings.zero_point == "integer":
                zero = np.clip(np.rint(zero), 0, top)
        if settings.half_grid:
            scale, zero = _half_grid(scale, zero, settings.zero_point)
        codes = np.clip(np.rint(block / scale[:, None] + zero[:, None]), 0, top)
        error = (((codes - zero[:, None]) * scale[:, None] - block) ** 2 * importance).sum(axis=1)
        if best_error is None:
            best_scale, best_zero, best_error = scale, zero, error
        else:
            better = error < best_error
            best_scale, best_zero = np.where(better, scale, best_scale), np.where(better, zero, best_zero)
            best_error = np.where(better, error, best_error)
    return best_scale, best_zero


def _half_grid(scale: np.ndarray, zero: np.ndarray, zero_point: str) -> tuple[np.ndarray, np.ndarray]:
    """``scale`` and ``zero`` moved onto what fp16 storage holds (a scale that fp16 flushes to 0, from a block of
    weights below ~1e-7, stays as it was: its dequantized weights are 0 either way)."""
    rounded = scale.astype(np.float16).astype(np.float64)
    scale = np.where(rounded != 0, rounded, scale)
    if zero_point == "float":
        zero = -(-scale * zero).astype(np.float16).astype(np.float64) / scale
    return scale, zero


def gptq_quantize(weight: np.ndarray, hessian: np.ndarray,
                  settings: GPTQSettings) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """GPTQ (Frantar et al. 2023) of one MatMul weight ``weight`` [K, N] (``Y = X @ W``) with the Hessian of its
    input ``hessian`` [K, K] (``sum x x^T``): the input channels are rounded one at a time and each one's
    rounding error is spread over the channels not yet rounded, through the inverse Hessian's Cholesky factor.
    Returns ``codes`` [N, K padded to whole blocks] (uint8, 0..2^bits-1; padding codes stand for 0),
    ``scales`` and ``zeros`` [N, blocks] float32, so that
    ``W[k, n] ≈ scales[n, k // block] * (codes[n, k] - zeros[n, k // block])``."""
    k, n = weight.shape
    block, half = settings.block_size, 1 << (settings.bits - 1)
    top = 2 * half - 1
    blocks = -(-k // block)
    w = weight.T.astype(np.float64)  # [N, K]: a column per input channel, as in the paper
    h = np.array(hessian, dtype=np.float64)
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    importance_all = np.diag(h).copy()
    order = np.argsort(-importance_all, kind="stable") if settings.act_order else np.arange(k)
    scales, zeros = np.ones((n, blocks)), np.full((n, blocks), float(half))
    if settings.act_order:  # static groups: the blocks stay contiguous in K, so their grids come first
        for b in range(blocks):
            cols = slice(b * block, min(k, (b + 1) * block))
            scales[:, b], zeros[:, b] = _block_grid(w[:, cols], importance_all[cols], settings)
    w, h = w[:, order], h[np.ix_(order, order)]
    h[np.diag_indices(k)] += settings.damp * float(np.mean(np.diag(h)))
    try:
        hinv = np.linalg.cholesky(np.linalg.inv(h)).T  # upper factor of H^-1
    except np.linalg.LinAlgError:
        raise EdgePruneError("GPTQ: the calibration Hessian is not positive definite; use more --calib text "
                             "or --weight-algorithm hqq") from None
    codes = np.zeros((n, k), dtype=np.uint8)
    lazy = block * max(1, 128 // block)  # whole blocks per lazy batch, so a block's columns are all in w1
    for start in range(0, k, lazy):
        stop = min(k, start + lazy)
        w1, err1 = w[:, start:stop].copy(), np.zeros((n, stop - start))
        h1 = hinv[start:stop, start:stop]
        for i in range(stop - start):
            col = order[start + i]
            b = col // block
            if not settings.act_order and col % block == 0:  # a new block: its grid from the updated weights
                width = min(block, k - col)
                scales[:, b], zeros[:, b] = _block_grid(w1[:, i:i + width], importance_all[col:col + width], settings)
            column = w1[:, i]
            q = np.clip(np.rint(column / scales[:, b] + zeros[:, b]), 0, top)
            codes[:, col] = q.astype(np.uint8)
            error = (column - (q - zeros[:, b]) * scales[:, b]) / h1[i, i]
            w1[:, i:] -= np.outer(error, h1[i, i:])
            err1[:, i] = error
        w[:, stop:] -= err1 @ hinv[start:stop, stop:]
    # padding: the code nearest each block's zero point (exactly 0 for the symmetric grid; onnxruntime pads
    # the inputs' K with zeros anyway, so these codes only have to be valid)
    padded = np.repeat(np.clip(np.rint(zeros), 0, top).astype(np.uint8), block, axis=1)
    padded[:, :k] = codes
    return padded, scales.astype(np.float32), zeros.astype(np.float32)


def dequantize(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int) -> np.ndarray:
    """The [K, N] fp32 weight that ``codes``/``scales``/``zeros`` (``gptq_quantize``'s layout) stand for."""
    n, padded = codes.shape
    block = padded // scales.shape[1]
    values = (codes.astype(np.float32).reshape(n, -1, block) - zeros[:, :, None]) * scales[:, :, None]
    return values.reshape(n, padded)[:, :k].T.copy()


def pack_codes(codes: np.ndarray, block_size: int, bits: int = 4) -> np.ndarray:
    """``codes`` [N, K padded] as ``MatMulNBits``' B input [N, blocks, block_size * bits / 8]: 4-bit codes two
    to a byte, the even index in the low nibble; 8-bit codes one to a byte."""
    n, padded = codes.shape
    if bits == 8:
        return codes.reshape(n, padded // block_size, block_size).copy()
    if bits != 4:
        raise EdgePruneError(f"GPTQ packing: {bits}-bit codes are not supported (4 or 8)")
    pairs = codes.reshape(n, -1, 2)
    packed = (pairs[:, :, 0] & 0x0F) | ((pairs[:, :, 1] & 0x0F) << 4)
    return packed.astype(np.uint8).reshape(n, padded // block_size, block_size // 2)


def pack_zero_points(zeros: np.ndarray) -> np.ndarray:
    """Integer 4-bit zero points [N, blocks] as ``MatMulNBits`` reads them: two per byte along the blocks of a
    column, the even block in the low nibble, an odd count padded."""
    codes = np.rint(zeros).astype(np.uint8)
    if codes.shape[1] % 2:
        codes = np.pad(codes, ((0, 0), (0, 1)))
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


# llama.cpp's block types GPTQ can round onto: (bits, zero point) of ``_block_grid``, 32 weights per block.
# The symmetric grid is ggml's own (d = extreme / -2^(bits-1), code = x / d + 2^(bits-1)); q8_0 stores the
# code minus 128 as int8, so its range is -128..127 where ggml's own quantizer uses -127..127.
GGML_GRIDS = {"q4_0": (4, "none"), "q5_0": (5, "none"), "q8_0": (8, "none"), "q4_1": (4, "float"),
              "q5_1": (5, "float")}
GGML_BLOCK = 32


def ggml_settings(qtype: str, **overrides) -> GPTQSettings:
    if qtype not in GGML_GRIDS:
        raise EdgePruneError(f"GPTQ writes the GGUF block types {', '.join(GGML_GRIDS)}, not {qtype!r}")
    bits, zero_point = GGML_GRIDS[qtype]
    return GPTQSettings(block_size=GGML_BLOCK, bits=bits, zero_point=zero_point, half_grid=True, **overrides)


def pack_ggml_blocks(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, qtype: str) -> np.ndarray:
    """``gptq_quantize``'s result under ``ggml_settings(qtype)`` (K a whole number of blocks) as the bytes of
    the GGUF tensor [N, blocks * block bytes], in ggml's block layouts (ggml-common.h): fp16 ``d`` (and ``m``
    for the ``_1`` types), for 5 bits a 32-bit mask of the codes' high bits, then the low nibbles with element
    j and j + 16 sharing byte j; q8_0 holds int8 codes."""
    n, k = codes.shape
    if k % GGML_BLOCK or scales.shape != (n, k // GGML_BLOCK):
        raise EdgePruneError(f"GGUF packing: {k} weights per row are not whole {GGML_BLOCK}-weight blocks")
    q = codes.reshape(n, k // GGML_BLOCK, GGML_BLOCK).astype(np.uint8)
    halves = lambda values: values.astype(np.float16)[:, :, None].view(np.uint8)  # noqa: E731 [n, blocks, 2]
    parts = [halves(scales)]
    if GGML_GRIDS[qtype][1] == "float":
        parts.append(halves(-scales.astype(np.float64) * zeros))
    if qtype == "q8_0":
        parts.append((q.astype(np.int16) - 128).astype(np.int8).view(np.uint8))
    else:
        if GGML_GRIDS[qtype][0] == 5:
            high = ((q >> 4) & 1).astype(np.uint32) << np.arange(GGML_BLOCK, dtype=np.uint32)
            parts.append(high.sum(axis=2, dtype=np.uint32).astype("<u4")[:, :, None].view(np.uint8))
        low = q & 0x0F
        parts.append(low[:, :, :16] | (low[:, :, 16:] << 4))
    return np.concatenate(parts, axis=2).reshape(n, -1)
