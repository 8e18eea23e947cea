"""DeepSparse 1.8 prefill and KV-cache decode of a decoder export, dense vs magnitude-sparse copies.

Runs under the DeepSparse venv's python (numpy, onnx, deepsparse; onnxruntime for the reference):

    ~/.cache/edgeprune/deepsparse-venv/bin/python benchmarks/tools/deepsparse_decoder.py EXPORT/model.onnx \
        --sparsity 0,0.5,0.7 --prompt 128 --capacity 256 --steps 32 --rounds 3 --threads 2 --json OUT.json

The cache layout is DeepSparse's own (deepsparse.transformers DecoderKVCache / NLDecoderEngine), as in
edgeprune's FixedCapacityCache: one engine for the ``prompt``-token prefill with a ``capacity - prompt`` slot
cache, one for single-token steps with a ``capacity - 1`` slot cache; empty slots masked by attention_mask.
Sparse copies zero the smallest-magnitude fraction of every 2-D MatMul weight of the transformer blocks
(per tensor; the tied embedding / LM head stays dense): a speed probe of DeepSparse's sparse kernels, not a
quality result. The first check: the dense engine's greedy tokens equal onnxruntime's with a growing cache.
Rounds alternate the order of the variants (interleaved); medians over rounds.
"""

import argparse
import json
import os
import statistics
import tempfile
import time

import numpy as np
import onnx
from onnx import numpy_helper


def static_copy(model, layout, inp_len, total, path):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name for i in m.graph.initializer}
    for v in m.graph.input:
        if v.name in inits:
            continue
        dims = v.type.tensor_type.shape.dim
        dims[0].dim_value = 1
        if v.name in ("input_ids", "position_ids"):
            dims[1].dim_value = inp_len
        elif v.name == "attention_mask":
            dims[1].dim_value = total
        elif v.name.startswith("past_key_values"):
            dims[2].dim_value = total - inp_len
    onnx.save(m, path)
    return path


def sparsify(model, fraction):
    m = onnx.ModelProto()
    m.CopyFrom(model)
    weights = {n.input[1] for n in m.graph.node if n.op_type == "MatMul"}
    zeroed = total = 0
    for k, init in enumerate(m.graph.initializer):
        if init.name not in weights or len(init.dims) != 2 or "embed" in init.name:
            continue
        w = numpy_helper.to_array(init).copy()
        cut = np.quantile(np.abs(w), fraction)
        w[np.abs(w) <= cut] = 0
        zeroed += int((w == 0).sum())
        total += w.size
        m.graph.initializer[k].CopyFrom(numpy_helper.from_array(w, init.name))
    return m, zeroed / max(total, 1)


class FixedCache:
    def __init__(self, prefill, decode, layout, prompt_slots, capacity):
        self.prefill, self.decode, self.layout = prefill, decode, layout
        self.p, self.s = prompt_slots, capacity

    def feeds(self, engine, ids, positions, real, cache):
        mask = np.zeros((1, self.s), np.int64)
        mask[0, self.s - real:] = 1
        d = {"input_ids": ids, "attention_mask": mask, "position_ids": positions}
        for i in range(len(self.layout)):
            d[f"past_key_values.{i}.key"], d[f"past_key_values.{i}.value"] = cache[2 * i], cache[2 * i + 1]
        return [d[name] for name in engine.input_names]

    def generate(self, prompt, steps, clock=time.perf_counter):
        n = len(prompt)
        ids = np.zeros((1, self.p), np.int64)
        ids[0, self.p - n:] = prompt
        pos = np.zeros((1, self.p), np.int64)
        pos[0, self.p - n:] = np.arange(n)
        cache = [np.zeros((1, h, self.s - self.p, d), np.float32) for h, d in self.layout for _ in (0, 1)]
        start = clock()
        out = self.prefill.run(self.feeds(self.prefill, ids, pos, n, cache))
        token = int(out[0][0, -1].argmax())
        prefill_s = clock() - start
        tokens, step_s, real = [token], [], n
        cache = [np.ascontiguousarray(c[:, :, 1:]) for c in out[1:]]  # DeepSparse takes C-contiguous inputs only
        for _ in range(steps):
            real += 1
            start = clock()
            out = self.decode.run(self.feeds(self.decode, np.array([[token]]), np.array([[real - 1]]), real, cache))
            token = int(out[0][0, -1].argmax())
            cache = [np.ascontiguousarray(c[:, :, 1:]) for c in out[1:]]  # DeepSparse takes C-contiguous inputs only
            step_s.append(clock() - start)
            tokens.append(token)
        return tokens, prefill_s, step_s


def ort_greedy(path, layout, prompt, steps):
    import onnxruntime as ort

    sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    past, start, ids, tokens = None, 0, np.asarray(prompt), []
    for _ in range(steps + 1):
        feeds = {"input_ids": ids[None].astype(np.int64), "attention_mask": np.ones((1, start + len(ids)), np.int64),
                 "position_ids": np.arange(start, start + len(ids))[None].astype(np.int64)}
        for i, (h, d) in enumerate(layout):
            for j, kind in enumerate(("key", "value")):
                feeds[f"past_key_values.{i}.{kind}"] = past[2 * i + j] if past else np.zeros((1, h, 0, d), np.float32)
        out = sess.run(None, feeds)
        tokens.append(int(out[0][0, -1].argmax()))
        past, start, ids = out[1:], start + len(ids), np.array([tokens[-1]])
    return tokens


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--sparsity", default="0,0.5,0.7")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--capacity", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--check", action="store_true", help="greedy tokens vs onnxruntime (dense) first")
    ap.add_argument("--only-input-len", type=int, help="compile one engine (this input length, --capacity) and stop")
    ap.add_argument("--json")
    args = ap.parse_args()
    import deepsparse

    model = onnx.load(args.model)
    layout = []
    for v in model.graph.input:
        if v.name.startswith("past_key_values") and v.name.endswith(".key"):
            dims = v.type.tensor_type.shape.dim
            layout.append((dims[1].dim_value, dims[3].dim_value))
    tmp = tempfile.mkdtemp(prefix="ds-decoder-")
    if args.only_input_len:
        started = time.perf_counter()
        deepsparse.Engine(static_copy(model, layout, args.only_input_len, args.capacity, os.path.join(tmp, "m.onnx")),
                          batch_size=1, num_cores=args.threads)
        print(f"compiled input {args.only_input_len}, capacity {args.capacity} in {time.perf_counter() - started:.1f} s")
        return
    variants, result = {}, {"model": args.model, "deepsparse": deepsparse.__version__, "threads": args.threads,
                            "prompt": args.prompt, "capacity": args.capacity, "steps": args.steps, "variants": {}}
    for fraction in (float(x) for x in args.sparsity.split(",")):
        m, actual = sparsify(model, fraction) if fraction else (model, 0.0)
        name = f"sparse-{round(fraction * 100)}" if fraction else "dense"
        started = time.perf_counter()
        engines = [deepsparse.Engine(static_copy(m, layout, length, args.capacity,
                                                 os.path.join(tmp, f"{name}-{length}.onnx")),
                                     batch_size=1, num_cores=args.threads) for length in (args.prompt, 1)]
        variants[name] = FixedCache(*engines, layout, args.prompt, args.capacity)
        result["variants"][name] = {"block_matmul_sparsity": round(actual, 4),
                                    "compile_s": round(time.perf_counter() - started, 1)}
        print(f"{name}: compiled in {result['variants'][name]['compile_s']} s", flush=True)
    prompt = np.random.default_rng(0).integers(100, 40000, args.prompt - 8)  # a left-padded prompt
    if args.check:
        expected = ort_greedy(args.model, layout, prompt, 8)
        got, _, _ = variants["dense"].generate(prompt, 8)
        result["greedy_check"] = {"onnxruntime": expected, "deepsparse": got, "equal": expected == got}
        print("greedy check", result["greedy_check"], flush=True)
    if not args.rounds:
        print(json.dumps(result), flush=True)
        return
    times = {k: {"prefill": [], "step": []} for k in variants}
    for name, v in variants.items():
        v.generate(prompt, 4)  # warm-up
    for r in range(args.rounds):
        order = list(variants) if r % 2 == 0 else list(reversed(variants))
        for name in order:
            _, prefill, steps = variants[name].generate(prompt, args.steps)
            times[name]["prefill"].append(prefill)
            times[name]["step"].append(statistics.median(steps))
    for name, t in times.items():
        prefill, step = statistics.median(t["prefill"]), statistics.median(t["step"])
        result["variants"][name].update({"prefill_ms": round(prefill * 1e3, 2), "prefill_tok_s": round(args.prompt / prefill, 1),
                                         "decode_ms_per_token": round(step * 1e3, 3), "decode_tok_s": round(1 / step, 1),
                                         "rounds_prefill_ms": [round(x * 1e3, 1) for x in t["prefill"]],
                                         "rounds_decode_ms": [round(x * 1e3, 2) for x in t["step"]]})
        print(name, result["variants"][name], flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
