#!/bin/bash
# README main command from a fresh clone of the branch, fresh venvs and cache, offline data via EDGEPRUNE_DATA
set -e
cd /tmp/s4e && git clone -q -b s4-encoder /work/wt/s4-encoder clone && cd clone
export EDGEPRUNE_DATA=/work/shared/data EDGEPRUNE_CACHE=/tmp/s4e/clone-cache
start=$(date +%s)
python3.11 -m venv .venv && . .venv/bin/activate && pip install -q -e ".[full]" && echo "install done $(( $(date +%s) - start ))s" && edgeprune runtime install deepsparse && echo "deepsparse done $(( $(date +%s) - start ))s" && edgeprune pipeline -o out/pipeline --overwrite
echo "main job total $(( $(date +%s) - start ))s"
