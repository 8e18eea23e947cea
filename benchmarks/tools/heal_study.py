"""Healing study on a depth-pruned SmolLM2-135M: which distillation data heals better at the same token
budget — WikiText-2 (the small corpus, valid split after its first 25,000 tokens) or text sampled from the
dense model itself (teacher-generated, cached, seeded; edgeprune/compress/teacher_data.py).

    python benchmarks/tools/heal_study.py OUT [--drop 9] [--steps 60] [--arms wikitext,teacher]

1. Block Influence (ShortGPT: 1 - cosine of a block's input and output hidden states, mean over tokens) of
   every block on ``--bi-windows`` x 256 tokens of the training region; the ``--drop`` lowest-BI blocks
   (never the first or last) are removed.
2. Each arm distils the cut model from the dense one with the project's decoder distillation
   (edgeprune.compress.finetune: KL(T=1) + 0.5 LM, lr 1e-4, batch 4 x 128, linear warmup/decay) for
   ``--steps`` steps = steps x 512 tokens, the same budget for every arm.
3. Every model (dense, cut, each arm): WikiText-2 valid perplexity on its first ``--ppl-tokens`` tokens
   (window 512, stride 256; never trained on) and LAMBADA acc on the first ``--limit`` dev items, PyTorch
   fp32. Each finished model is saved as an HF directory (OUT/<name>/, exportable to GGUF) and appended to
   OUT/points.jsonl; a re-run skips what is there. OUT/table.md summarises.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time
from pathlib import Path


def block_influence(model, blocks: list[list[int]]) -> list[float]:
    import torch

    totals = None
    with torch.inference_mode():
        for ids in blocks:
            hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True, use_cache=False).hidden_states
            # hidden_states[i] is block i's input; the last entry is after the final norm, so block n-1's
            # output is not in the list: its BI is taken against the normed output (it is never dropped).
            values = [1 - torch.nn.functional.cosine_similarity(hidden[i], hidden[i + 1], dim=-1).mean().item()
                      for i in range(len(hidden) - 1)]
            totals = values if totals is None else [a + b for a, b in zip(totals, values)]
    return [v / len(blocks) for v in totals]


def drop_blocks(model, drop: list[int]) -> None:
    import torch

    keep = [i for i in range(len(model.model.layers)) if i not in set(drop)]
    model.model.layers = torch.nn.ModuleList([model.model.layers[i] for i in keep])
    for j, layer in enumerate(model.model.layers):
        layer.self_attn.layer_idx = j  # KV-cache slots follow the new order
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]


def evaluate(loaded, args, data) -> dict:
    from edgeprune.eval.api import EvalConfig, evaluate_backend
    from edgeprune.eval.backends import TorchBackend

    backend = TorchBackend(loaded, threads=args.threads)
    out = {}
    ppl = evaluate_backend(backend, data["perplexity"], EvalConfig(task="perplexity", max_tokens=args.ppl_tokens))
    out["perplexity"] = {"value": ppl["value"], "n": ppl["n"], "seconds": ppl["seconds"]}
    for task in args.tasks:
        r = evaluate_backend(backend, data[task], EvalConfig(task=task, limit=args.limit, batch_size=16))
        out[task] = {k: r[k] for k in ("metric", "value", "acc", "acc_norm", "n", "seconds") if k in r}
    return out


def save_hf(loaded, directory: Path) -> None:
    tmp = directory.with_name(directory.name + ".tmp")
    loaded.model.save_pretrained(tmp, safe_serialization=True)
    loaded.tokenizer.save_pretrained(tmp)
    if directory.exists():
        import shutil

        shutil.rmtree(directory)
    os.replace(tmp, directory)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--drop", type=int, default=9, help="blocks to remove (lowest Block Influence)")
    ap.add_argument("--steps", type=int, default=60, help="distillation steps per arm (x 4 x 128 tokens)")
    ap.add_argument("--arms", default="wikitext,teacher")
    ap.add_argument("--ppl-tokens", type=int, default=8192)
    ap.add_argument("--limit", type=int, default=200, help="zero-shot items per task")
    ap.add_argument("--tasks", default="lambada", help="zero-shot tasks, comma-separated")
    ap.add_argument("--bi-windows", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--lora-rank", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.tasks = [t for t in args.tasks.split(",") if t]

    import torch

    from edgeprune.compress.api import CompressConfig
    from edgeprune.compress.finetune import finetune, lm_blocks
    from edgeprune.core.data_sources import resolve_data
    from edgeprune.core.loading import load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    points_file = out / "points.jsonl"
    done = {json.loads(l)["name"]: json.loads(l) for l in points_file.read_text().splitlines()} \
        if points_file.exists() else {}
    data = {t: resolve_data(k) for t, k in (("perplexity", "wikitext2:valid"), ("lambada", "lambada:dev"),
                                            ("hellaswag", "hellaswag:dev"), ("piqa", "piqa:dev"))}
    recipe = CompressConfig.from_file(Path(__file__).resolve().parents[2] / "edgeprune/recipes/smollm2-25-distill.yaml")

    def record(name: str, loaded, extra: dict) -> None:
        started = time.time()
        scores = evaluate(loaded, args, data)
        point = dict(name=name, scores=scores, eval_seconds=round(time.time() - started, 1),
                     load_average=list(os.getloadavg()), **extra)
        with open(points_file, "a") as handle:
            handle.write(json.dumps(point) + "\n")
        done[name] = point
        print(json.dumps(point), flush=True)

    dense = load_model(args.model)
    if "dense" not in done:
        record("dense", dense, {"layers": len(dense.model.model.layers)})
    calib = lm_blocks(dense.tokenizer, str(data["perplexity"]), 256, skip_tokens=25000)[: args.bi_windows]
    bi = block_influence(dense.model, calib)
    order = sorted(range(1, len(bi) - 1), key=lambda i: bi[i])
    drop = sorted(order[: args.drop])
    (out / "block_influence.json").write_text(json.dumps({"bi": bi, "drop": drop}, indent=1))
    print(f"block influence: {[round(b, 4) for b in bi]}\ndrop: {drop}", flush=True)
    cut = copy.copy(dense)
    cut.model = copy.deepcopy(dense.model)
    drop_blocks(cut.model, drop)
    base = {"drop": drop, "layers": len(cut.model.model.layers)}
    name = f"cut{args.drop}"
    if name not in done:
        save_hf(cut, out / name)
        record(name, cut, base)
    for arm in [a for a in args.arms.split(",") if a]:
        name = f"cut{args.drop}-{arm}-{args.steps}" + (f"-lora{args.lora_rank}" if args.lora_rank else "")
        if name in done:
            continue
        student = copy.copy(cut)
        student.model = copy.deepcopy(cut.model)
        tokens = args.steps * recipe.finetune.batch_size * recipe.finetune.max_length
        cfg = recipe.finetune.replace(max_steps=args.steps, learning_rate=args.lr, lora_rank=args.lora_rank,
                                      **({"data": "teacher", "teacher_tokens": tokens} if arm == "teacher"
                                         else {"data": str(data["perplexity"]), "skip_tokens": 25000}))
        summary, log = finetune(student, cfg, teacher=dense.model, seed=args.seed)
        (out / f"{name}.log.jsonl").write_text("".join(json.dumps(r) + "\n" for r in log))
        save_hf(student, out / name)
        record(name, student, dict(base, arm=arm, finetune=summary))
    write_table(out, list(done.values()), args)


def write_table(out: Path, points: list[dict], args) -> None:
    dense = next(p for p in points if p["name"] == "dense")["scores"]
    tasks = ["perplexity"] + args.tasks
    lines = ["| model | blocks | data | tokens | steps/s | " + " | ".join(tasks) + " | vs dense |",
             "| --- | --- | --- | --- | --- | " + " | ".join("---" for _ in tasks) + " | --- |"]
    for p in points:
        s, ft = p["scores"], p.get("finetune") or {}
        rate = f"{ft['steps'] / ft['seconds']:.3f}" if ft else "–"
        vs = " / ".join(f"{(s[t]['value'] / dense[t]['value'] - 1):+.1%}" for t in tasks)
        lines.append(f"| {p['name']} | {p['layers']} | {p.get('arm', '–')} | {ft.get('tokens_seen', 0):,} | {rate} | "
                     + " | ".join(f"{s[t]['value']:.4g}" for t in tasks) + f" | {vs} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
