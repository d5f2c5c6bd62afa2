#!/usr/bin/env bash
# Evaluation part 2 on the README's three smoke runs (train them first: python train.py
# model=hope|titans|transformer): the peak-memory rows of NIAH by length, continual learning
# across the SOTU eras (with and without memorisation), NIAH (all variants to 16k, with and
# without memorisation), the single-needle sweep to 512k at depth 50 (the baselines within a
# time budget), and passkey to 16k. Results in $OUT (default results/smoke).
#   bash scripts/eval/smoke_study.sh
set -euo pipefail
RUNS=${RUNS:-runs}
OUT=${OUT:-results/smoke}
BUDGET=${BUDGET:-240}   # seconds per baseline for the long single-needle sweep
ALL="$RUNS/hope-smoke,$RUNS/titans-smoke,$RUNS/transformer-smoke"
mkdir -p "$OUT"
python bench/niah_memory.py --run "$RUNS/hope-smoke" --lengths 16k,64k,256k --json "$OUT/niah_memory.json" \
    | tee "$OUT/niah_memory.log"
for m in hope titans transformer; do
    python scripts/eval/continual.py --run "$RUNS/$m-smoke" --segments sotu-eras --steps-per-segment 50 \
        --memorize --out "$OUT/continual_$m" --no-progress | tee "$OUT/continual_$m.log"
done
python scripts/eval/niah.py --run "$ALL" --lengths 2k,4k,...,16k --depths 0,50,100 --samples 2 \
    --memorize --out "$OUT/niah" --no-progress | tee "$OUT/niah.log"
python scripts/eval/niah.py --run "$RUNS/hope-smoke" --lengths 2k,4k,...,512k --depths 50 --samples 2 \
    --variants single --out "$OUT/niah_long_hope" --no-progress | tee "$OUT/niah_long_hope.log"
for m in titans transformer; do
    python scripts/eval/niah.py --run "$RUNS/$m-smoke" --lengths 2k,4k,...,512k --depths 50 --samples 2 \
        --variants single --time-budget "$BUDGET" --out "$OUT/niah_long_$m" --no-progress | tee "$OUT/niah_long_$m.log"
done
python scripts/eval/passkey.py --run "$ALL" --lengths 2k,4k,...,16k --depths 0,50,100 --samples 2 \
    --out "$OUT/passkey" --no-progress | tee "$OUT/passkey.log"
echo "results in $OUT"
