# decode tok/s at KV depth 0 vs 128 (FA on, one context), interleaved
import sys, time, statistics, numpy as np
sys.path.append("/root/.cache/edgeprune/llamacpp/install/site")
import llama_cpp
llm = llama_cpp.Llama(model_path=sys.argv[1], n_threads=2, n_threads_batch=2, n_ctx=int(sys.argv[2]), n_batch=512, n_ubatch=512, flash_attn=sys.argv[3] == "fa", verbose=False)
prompt = list(np.random.default_rng(0).integers(0, 49152, 128))
def run(depth, n=32):
    llm.reset(); llm._ctx.kv_cache_clear()
    if depth:
        llm._batch.set_batch(batch=prompt[:depth], n_past=0, logits_all=False); llm._ctx.decode(llm._batch)
    tok = 1; t = time.perf_counter()
    for i in range(n):
        llm._batch.set_batch(batch=[tok], n_past=depth + i, logits_all=False); llm._ctx.decode(llm._batch)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(49152,))))
    return n / (time.perf_counter() - t)
run(0, 8); run(128, 8)
res = {0: [], 128: []}
for r in range(5):
    for d in res: res[d].append(run(d))
for d, v in res.items(): print(sys.argv[2:], "depth", d, "median", round(statistics.median(v), 1), [round(x, 1) for x in v])
