"""edgeprune's zero-shot scores next to lm-evaluation-harness's on the same local items.

    pip install -e ".[crosscheck]"                       # lm-eval, test-only
    python benchmarks/tools/save_hf.py smollm2-135m out/smollm2-hf
    python benchmarks/tools/lm_eval_crosscheck.py out/smollm2-hf --limit 300 --json

lm-eval runs its ``hf`` model on the task configs in benchmarks/lm-eval/ (copies of lm-eval's lambada_openai,
hellaswag and piqa that read the local jsonl that ``edgeprune.core.data_sources`` resolves); edgeprune runs the
same directory through PyTorch. Both take the first ``--limit`` items.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

TASK_DIR = Path(__file__).resolve().parents[1] / "lm-eval"
TASKS = ("lambada", "hellaswag", "piqa")
METRICS = {"lambada": ("acc", "perplexity"), "hellaswag": ("acc", "acc_norm"), "piqa": ("acc", "acc_norm")}


def write_task_configs(directory: Path, data: dict[str, Path]) -> None:
    """The task YAMLs with @DATA@ replaced by each task's local file, plus the hellaswag utils module."""
    for task, path in data.items():
        text = (TASK_DIR / f"edgeprune_{task}.yaml").read_text().replace("@DATA@", str(path))
        (directory / f"edgeprune_{task}.yaml").write_text(text)
    shutil.copy(TASK_DIR / "utils.py", directory / "utils.py")


def run_lm_eval(model_dir: str, data: dict[str, Path], limit: int, batch_size: int) -> dict[str, dict[str, float]]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    with tempfile.TemporaryDirectory(prefix="edgeprune-lm-eval-") as tmp:
        write_task_configs(Path(tmp), data)
        output = lm_eval.simple_evaluate(
            model="hf", model_args=f"pretrained={model_dir},dtype=float32", tasks=[f"edgeprune_{t}" for t in data],
            num_fewshot=0, batch_size=batch_size, device="cpu", limit=limit,
            task_manager=TaskManager(include_path=tmp))
    return {task: {m: float(output["results"][f"edgeprune_{task}"][f"{m},none"]) for m in METRICS[task]}
            for task in data}


def run_edgeprune(model_dir: str, data: dict[str, Path], limit: int, batch_size: int) -> dict[str, dict[str, float]]:
    from edgeprune.eval.api import EvalConfig, evaluate

    return {task: {k: v for k, v in evaluate(model_dir, data[task], EvalConfig(task=task, limit=limit,
                                                                                batch_size=batch_size)).items()}
            for task in data}


def compare(model_dir: str, limit: int = 300, tasks=TASKS, batch_size: int = 16) -> dict:
    from edgeprune.eval.api import resolve_task_data

    data = {task: resolve_task_data(task, None) for task in tasks}
    started = time.perf_counter()
    ours = run_edgeprune(model_dir, data, limit, batch_size)
    ours_s = time.perf_counter() - started
    started = time.perf_counter()
    theirs = run_lm_eval(model_dir, data, limit, batch_size)
    theirs_s = time.perf_counter() - started
    rows = []
    for task in tasks:
        for metric in METRICS[task]:
            a, b = ours[task][metric], theirs[task][metric]
            # accuracies in points (x100); perplexity as a relative difference in percent
            diff = (a - b) * 100 if metric != "perplexity" else (a / b - 1) * 100
            rows.append({"task": task, "metric": metric, "edgeprune": a, "lm_eval": b, "diff_points": diff,
                         "n": ours[task]["n"]})
    return {"model": model_dir, "limit": limit, "rows": rows, "edgeprune_s": round(ours_s, 1),
            "lm_eval_s": round(theirs_s, 1), "data": {t: str(p) for t, p in data.items()}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_dir", help="a Hugging Face model directory (benchmarks/tools/save_hf.py writes one)")
    parser.add_argument("--limit", type=int, default=300)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    result = compare(args.model_dir, args.limit, tuple(t for t in args.tasks.split(",") if t), args.batch_size)
    print("| task | metric | edgeprune | lm-eval | difference |\n| --- | --- | --- | --- | --- |")
    for r in result["rows"]:
        unit = "% (relative)" if r["metric"] == "perplexity" else " points"
        print(f"| {r['task']} | {r['metric']} | {r['edgeprune']:.4f} | {r['lm_eval']:.4f} | {r['diff_points']:+.2f}{unit} |")
    print(f"n = {args.limit} items per task; edgeprune {result['edgeprune_s']} s, lm-eval {result['lm_eval_s']} s")
    if args.json:
        print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
