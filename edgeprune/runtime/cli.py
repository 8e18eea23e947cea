"""``edgeprune run`` and ``edgeprune runtime install|list``. Torch-free: these run on the edge device."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="run an exported model on a runtime (embedding, classification or generation)",
                              description="Run an exported model on a runtime. Prints the embedding, class "
                                          "probabilities or generated text, depending on the export's task.")
    p.add_argument("artifact", help="export directory (or a .onnx file inside one; a .gguf file for llamacpp)")
    p.add_argument("--runtime", default="onnxruntime", help="onnxruntime (default), deepsparse or llamacpp")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="one input text")
    source.add_argument("--input", help="file with one input text per line (runs them all, with progress)")
    p.add_argument("--max-new-tokens", type=int, default=32, help="generation: tokens to generate (default 32)")
    p.add_argument("--sample", action="store_true", help="generation: sample instead of greedy decoding")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="generation: keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="generation: nucleus sampling mass (1: off)")
    p.add_argument("--seed", type=int, help="generation: random seed for sampling")
    p.add_argument("--max-length", type=int, default=128, help="encoders: truncate inputs to this many tokens")
    p.add_argument("--batch-size", type=int, default=32, help="encoders with --input: texts per call")
    p.add_argument("--threads", type=int, help="CPU threads (cores) for the runtime")
    p.add_argument("--json", action="store_true", help="print the results as one JSON object on the last line")
    p.set_defaults(func=run_command)

    r = subparsers.add_parser("runtime", help="install or list inference runtimes")
    actions = r.add_subparsers(dest="action", metavar="ACTION")
    actions.required = True
    inst = actions.add_parser("install", help="create the DeepSparse virtualenv or build llama.cpp in the user cache")
    inst.add_argument("name", choices=["deepsparse", "llamacpp"])
    inst.add_argument("--jobs", type=int, help="llamacpp: parallel compile jobs (default: all cores)")
    inst.add_argument("--no-tools", action="store_true",
                      help="llamacpp: skip the upstream llama-bench/llama-perplexity/... cross-check tools")
    inst.add_argument("--force", action="store_true", help="rebuild it even if it works")
    inst.set_defaults(func=install_command)
    lst = actions.add_parser("list", help="show each runtime and whether it is available (and why not)")
    lst.add_argument("--json", action="store_true")
    lst.set_defaults(func=list_command)


def _read_lines(path: str) -> list[str]:
    import os
    import stat

    from edgeprune.core.errors import EdgePruneError

    try:
        mode = os.stat(path).st_mode
    except OSError as exc:
        raise EdgePruneError(f"cannot read --input file {path}: {exc.strerror}") from None
    if not stat.S_ISREG(mode):  # /dev/zero, a FIFO or a directory would be read forever or not at all
        raise EdgePruneError(f"--input {path} is not a regular file; pass a text file with one input per line")
    try:
        with open(path, encoding="utf-8") as handle:
            lines = [line.rstrip("\n") for line in handle]
    except OSError as exc:
        raise EdgePruneError(f"cannot read --input file {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise EdgePruneError(f"--input {path} is not UTF-8 text (byte {exc.start}); pass a text file with one "
                             "input per line") from None
    lines = [line for line in lines if line.strip()]
    if not lines:
        raise EdgePruneError(f"{path}: no non-empty lines to run")
    return lines


def run_command(args: argparse.Namespace) -> int:
    import time

    from tqdm.auto import tqdm

    from edgeprune.core.console import print_json_last
    from edgeprune.core.errors import EdgePruneError, check_minimums
    from edgeprune.runtime.pipelines import ClassificationPipeline, GenerationPipeline, build_pipeline

    check_minimums(args, threads=1, batch_size=1, top_k=0, max_length=2, max_new_tokens=0)
    if not 0 < args.top_p <= 1:
        raise EdgePruneError(f"--top-p must be in (0, 1] (got {args.top_p})")
    if args.sample and args.temperature <= 0:
        raise EdgePruneError(f"--temperature must be > 0 when sampling (got {args.temperature})")
    texts = [args.text] if args.text is not None else _read_lines(args.input)
    started = time.perf_counter()
    pipeline = build_pipeline(args.artifact, args.runtime, args.threads, max_length=args.max_length)
    load_seconds = time.perf_counter() - started
    results: list = []
    progress = args.input is not None
    try:
        if isinstance(pipeline, GenerationPipeline):
            for text in tqdm(texts, desc="generating", disable=not progress):
                try:
                    out = pipeline(text, args.max_new_tokens, do_sample=args.sample, temperature=args.temperature,
                                   top_k=args.top_k, top_p=args.top_p, seed=args.seed)
                except EdgePruneError as exc:
                    partial = getattr(exc, "generated_text", None)
                    if partial is not None:  # context overflow: show what was generated before it
                        print(partial, flush=True)
                    raise
                results.append(out)
                print(out if not progress else out.replace("\n", "\\n"), flush=True)
                if pipeline.stopped_at_limit:
                    print(f"edgeprune: note: stopped at the model's {pipeline.stopped_at_limit}-token limit (prompt "
                          "plus generated tokens); the text above is what fitted", file=sys.stderr)
        else:
            size = args.batch_size
            for start in tqdm(range(0, len(texts), size), desc="running", disable=not progress):
                values = pipeline(texts[start:start + size])
                for text, row in zip(texts[start:start + size], values):
                    if isinstance(pipeline, ClassificationPipeline):
                        labels = pipeline.labels or [f"LABEL_{i}" for i in range(len(row))]
                        result = {label: round(float(p), 6) for label, p in zip(labels, row)}
                        print(f"{max(result, key=result.get)}\t{json.dumps(result)}")
                    else:
                        result = [round(float(x), 6) for x in row]
                        print(f"embedding[{len(row)}] " + " ".join(f"{x:+.4f}" for x in row[:8]) + " ...")
                    results.append(result)
    finally:
        pipeline.session.close()
    seconds = time.perf_counter() - started
    if args.json:
        print_json_last({"runtime": args.runtime, "task": type(pipeline).__name__, "n": len(texts),
                         "load_seconds": round(load_seconds, 3), "seconds": round(seconds, 3), "results": results})
    return 0


def install_command(args: argparse.Namespace) -> int:
    if args.name == "llamacpp":
        from edgeprune.runtime.llamacpp_install import install as install_llamacpp

        info = install_llamacpp(force=args.force, jobs=args.jobs, tools=not args.no_tools)
        state = "already installed" if info["already_installed"] else f"built in {info['seconds']} s"
        print(f"llama.cpp (llama-cpp-python {info['version']}) {state}: {info['variant']} build for {info['cpu']}; "
              f"self-test generated {len(info['self_test'].get('generated', []))} tokens; tools: "
              f"{', '.join(info.get('tools', [])) or 'none'}")
        print(f"cmake flags: {' '.join(info['cmake_flags'])}")
        return 0
    from edgeprune.runtime.deepsparse_adapter import install

    result = install(force=args.force)
    if result["already_installed"]:
        print(f"deepsparse already installed: {result['python']} (use --force to rebuild)")
    else:
        print(f"installed deepsparse into {result['venv']} in {result['seconds']} s")
    return 0


def list_command(args: argparse.Namespace) -> int:
    from edgeprune.core.console import print_json_last
    from edgeprune.runtime.base import get_runtime, runtime_names

    rows = []
    for name in runtime_names():
        runtime = get_runtime(name, require_available=False)
        ok = runtime.available()
        rows.append({"name": name, "available": ok, "reason": "" if ok else runtime.why_unavailable()})
        print(f"{name:12s} {'available' if ok else 'unavailable: ' + rows[-1]['reason']}")
    if args.json:
        print_json_last({"runtimes": rows})
    return 0

