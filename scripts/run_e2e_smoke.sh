#!/usr/bin/env bash
# The whole path in one command on the CPU, in minutes: prepare the default corpus (tokenized once
# into memory-mapped shards), train the smoke HOPE model, export it as one safetensors file, and
# evaluate the export with the evaluation scripts (perplexity by position, the zero-shot pack,
# needle in a haystack, passkey), then a report from the result files.
#   bash scripts/run_e2e_smoke.sh                         # into runs/e2e-smoke
#   OUT=/tmp/e2e STEPS=20 TASKS=blimp,my_task.jsonl BLIMP_PAIRS=20 bash scripts/run_e2e_smoke.sh
# TASKS=all is BLiMP (shipped with the package: nothing to download), BLIMP_PAIRS pairs of each of its
# 67 paradigms (a seeded sample; 1000 is all of them), plus the BIG-bench tasks only where a copy of
# the bigbench 1.0.0 sdist is at hand (a line says when they are skipped); LIMIT items of each
# multiple-choice task. Every step prints what it wrote; the last lines say where.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/e2e-smoke}
STEPS=${STEPS:-150}
TASKS=${TASKS:-all}
LIMIT=${LIMIT:-100}
BLIMP_PAIRS=${BLIMP_PAIRS:-50}
RUN="$OUT/run"
RES="$OUT/results"
mkdir -p "$RES"
echo "== 1/6 prepare the corpus (shards; a no-op when they exist)"
python scripts/prepare_data.py
echo "== 2/6 train the smoke HOPE model for $STEPS steps"
python train.py train.out_dir="$RUN" train.steps="$STEPS" train.export=true train.progress=false \
    train.resume=false train.overwrite=true
echo "== 3/6 perplexity by position (the run's validation documents)"
python scripts/eval/perplexity.py --run "$RUN/export" --max-docs 2 --out "$RES" --no-progress
echo "== 4/6 zero-shot ($TASKS: BLiMP $BLIMP_PAIRS pairs per paradigm, $LIMIT items of each other task)"
python scripts/eval/zeroshot.py --run "$RUN/export" --tasks "$TASKS" --limit "$LIMIT" --blimp-pairs "$BLIMP_PAIRS" \
    --out "$RES" --no-progress
echo "== 5/6 needle in a haystack and passkey at 2k tokens"
python scripts/eval/niah.py --run "$RUN/export" --lengths 2k --depths 0,50,100 --samples 1 --variants single \
    --out "$RES/niah" --no-progress
python scripts/eval/passkey.py --run "$RUN/export" --lengths 2k --depths 0,50,100 --samples 1 \
    --out "$RES/passkey" --no-progress
echo "== 6/6 report"
python scripts/eval/report.py "$RES" --out "$RES/REPORT.md"
echo "run (checkpoints, metrics.jsonl, train.log): $RUN"
echo "exported model (model.safetensors, config): $RUN/export"
echo "results (JSON, PNG) and the report: $RES, $RES/REPORT.md"
