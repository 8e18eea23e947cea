# A/B of llama.cpp context settings for decode speed (interleaved): flash attention, n_ctx
import sys, time, statistics, numpy as np
sys.path.append("/root/.cache/edgeprune/llamacpp/install/site")
import llama_cpp
path = sys.argv[1]
configs = {"fa-on ctx2048": dict(flash_attn=True, n_ctx=2048), "fa-on ctx256": dict(flash_attn=True, n_ctx=256), "fa-off ctx2048": dict(flash_attn=False, n_ctx=2048), "fa-off ctx256": dict(flash_attn=False, n_ctx=256)}

llms = {k: llama_cpp.Llama(model_path=path, n_threads=2, n_threads_batch=2, n_batch=512, n_ubatch=512, verbose=False, **v) for k, v in configs.items()}
prompt = list(np.random.default_rng(0).integers(0, 49152, 128))
res = {k: ([], []) for k in llms}
def run(llm, n):
    llm.reset(); llm._ctx.kv_cache_clear()
    t = time.perf_counter(); llm._batch.set_batch(batch=prompt, n_past=0, logits_all=False); llm._ctx.decode(llm._batch); pre = time.perf_counter() - t
    tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(49152,))))
    t = time.perf_counter()
    for i in range(n):
        llm._batch.set_batch(batch=[tok], n_past=128 + i, logits_all=False); llm._ctx.decode(llm._batch)
        tok = int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(49152,))))
    return pre, n / (time.perf_counter() - t)
for k, l in llms.items(): run(l, 8)
for r in range(4):
    for k, l in llms.items():
        pre, tps = run(l, 32); res[k][0].append(pre); res[k][1].append(tps)
for k, (p, t) in res.items():
    print(f"{k:16s} prefill p50 {1000*statistics.median(p):7.1f} ms ({128/statistics.median(p):6.1f} tok/s)  decode p50 {statistics.median(t):6.1f} tok/s  {[round(x,1) for x in t]}")
