#!/usr/bin/env bash
# Reproduce the benchmark suites in this folder: each suite is a pipeline recipe (compress -> export ->
# bench) and leaves OUT/<suite>/report/{report.json,report.md,*.png}.
#
#   benchmarks/run.sh                      # all suites into runs/<UTC date-time>
#   benchmarks/run.sh OUT minilm-stsb      # one suite into OUT
#   benchmarks/run.sh OUT seed-study       # SmolLM2 pruning-robustness study (LAMBADA, HellaSwag, PIQA, ppl)
#
# Timings are only as good as the machine is quiet: close other work, keep the laptop on power.
# Data come by key (stsb:dev, wikitext2:valid, ...) from the hub; offline, set EDGEPRUNE_DATA to a local copy
# (the folder holding stsb/ and wikitext-2/; ../shared/data beside the checkout is found without it).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="${1:-runs/$(date -u +%Y%m%d-%H%M%S)}"
shift || true
suites=("$@")
if [ ${#suites[@]} -eq 0 ]; then
  suites=(minilm-stsb smollm2-wikitext)
fi
mkdir -p "$out"
{
  echo "date: $(date -u +%Y-%m-%dT%H:%M:%SZ)"
  echo "cpu: $(grep -m1 'model name' /proc/cpuinfo 2>/dev/null | cut -d: -f2- | sed 's/^ //')"
  echo "cores: $(nproc)"
  echo "load average: $(cut -d' ' -f1-3 /proc/loadavg 2>/dev/null)"
  echo "edgeprune: $(edgeprune --version)"
  echo "commit: $(git -C "$here" rev-parse --short HEAD 2>/dev/null || echo unknown)"
} | tee "$out/machine.txt"
for suite in "${suites[@]}"; do
  case "$suite" in
    smollm2*) edgeprune models fetch smollm2-135m >/dev/null ;;
  esac
  start=$(date +%s)
  if [ "$suite" = seed-study ]; then
    # not a pipeline recipe: compress + evaluate 11 SmolLM2 points (benchmarks/tools/seed_study.py --help);
    # extra options pass through SEED_STUDY_ARGS, e.g. SEED_STUDY_ARGS="--limit 300 --finetune-steps 25"
    echo "== $suite: python $here/tools/seed_study.py $out/$suite ${SEED_STUDY_ARGS:-}"
    # shellcheck disable=SC2086
    python "$here/tools/seed_study.py" "$out/$suite" ${SEED_STUDY_ARGS:-} 2>&1 | tee "$out/$suite.log"
  else
    echo "== $suite: edgeprune pipeline $here/$suite.yaml -o $out/$suite"
    edgeprune pipeline "$here/$suite.yaml" -o "$out/$suite" --overwrite 2>&1 | tee "$out/$suite.log"
  fi
  echo "== $suite finished in $(( $(date +%s) - start ))s" | tee -a "$out/$suite.log"
done
echo "reports: $out/*/report/report.md"
