# one locked run: upstream llama-bench and edgeprune bench alternated (3 pairs) on the same files
. /work/venv/bin/activate; export EDGEPRUNE_DATA=/work/shared/data PYTHONPATH=/work/wt/s4-llm
cd /work/wt/s4-llm
BIN=~/.cache/edgeprune/llamacpp/install/bin
O=$1; shift; mkdir -p $O
MS=""; for f in "$@"; do MS="$MS -m $f"; done
CANDS=""; for f in "${@:2}"; do CANDS="$CANDS --candidate $f"; done
grep -m1 'model name' /proc/cpuinfo
for r in 1 2 3; do
  echo "== pair $r $(date -u +%T) load: $(cut -d' ' -f1-3 /proc/loadavg)"
  $BIN/llama-bench $MS -t 2 -p 128 -n 32 -r 2 -o jsonl 2>/dev/null > $O/llama-bench$r.jsonl
  $BIN/llama-bench $MS -t 2 -p 0 -n 32 -d 128 -r 2 -o jsonl 2>/dev/null > $O/llama-bench-d128-$r.jsonl
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
  python -m edgeprune.cli bench --dense $1 $CANDS --runtime llamacpp --threads 2 --seq 128 --new-tokens 32 --rounds 2 --warmup 1 -o $O/bench$r --overwrite 2>$O/bench$r.err >/dev/null
  echo "load: $(cut -d' ' -f1-3 /proc/loadavg)"
done
