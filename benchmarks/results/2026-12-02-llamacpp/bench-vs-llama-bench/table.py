# llama-bench vs edgeprune bench: medians over the pairs of one locked run
import json, sys, glob, statistics as st, os
O = sys.argv[1]; HOME = os.path.expanduser("~")
lb, lbd, eb = {}, {}, {}
for f in sorted(glob.glob(f"{O}/llama-bench[0-9]*.jsonl")):
    for line in open(f):
        j = json.loads(line); name = os.path.realpath(j["model_filename"])
        key = "pp" if j["n_prompt"] else "tg"
        lb.setdefault((name, key), []).append(j["avg_ts"])
for f in sorted(glob.glob(f"{O}/llama-bench-d128-*.jsonl")):
    for line in open(f):
        j = json.loads(line); lbd.setdefault(os.path.realpath(j["model_filename"]), []).append(j["avg_ts"])
for f in sorted(glob.glob(f"{O}/bench*/report.json")):
    rep = json.load(open(f))
    for m in rep["models"]:
        name = os.path.realpath(m["path"])
        name = name if name.endswith(".gguf") else name + "/model.gguf"
        for run in m["runs"]:
            for d in run.get("decode", []):
                # llama-bench's t/s is tokens / total time: compare the mean-based rates (1 / mean step)
                eb.setdefault(name, []).append((d["prefill"]["mean_ms"], d["step"]["throughput_tok_s"], d["decode_tokens_s"]))
print("| file | llama-bench pp128 t/s | edgeprune prefill 128 t/s | ratio | llama-bench tg32 t/s | llama-bench tg32 @ depth 128 | edgeprune decode t/s (after the 128-token prompt) | ratio vs tg32 | ratio vs tg32@d128 |")
print("|---|---|---|---|---|---|---|---|---|")
for name in lbd:
    pp, tg, tgd = st.median(lb[(name, "pp")]), st.median(lb[(name, "tg")]), st.median(lbd[name])
    e = [v for k, v in eb.items() if k == name]
    if not e: print(name, "no edgeprune rows", list(eb)); continue
    e = e[0]; epp = st.median(128 / (p / 1000) for p, _, _ in e); etg = st.median(t for _, t, _ in e)
    print(f"| {name.replace(HOME, '~')} | {pp:.1f} | {epp:.1f} | {epp/pp:.3f} | {tg:.1f} | {tgd:.1f} | {etg:.1f} | {etg/tg:.3f} | {etg/tgd:.3f} |")
