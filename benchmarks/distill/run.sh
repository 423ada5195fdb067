#!/usr/bin/env bash
# Distillation vs SimCLR for one small student at equal budget (issue #35); README.md here says what it measures.
#
#   benchmarks/distill/run.sh                      # the full comparison on Fashion-MNIST (hours on 2 CPU cores)
#   TEACHER=runs/demo benchmarks/distill/run.sh    # reuse a trained teacher (a run directory or an exported file)
#   DATA=digits EPOCHS=1 TEACHER_EPOCHS=1 BATCH=64 OUT=/tmp/distill_smoke benchmarks/distill/run.sh   # smoke check
#
# 1. the teacher: the default recipe (configs/essl_fashion_mnist.yaml: small_resnet 32-64-128-512, 2,048-d), or
#    TEACHER_RECIPE=configs/simclr_fashion_mnist.yaml (SimCLR, same widths); skipped when TEACHER is given;
# 2. the student distilled from it: configs/distill_fashion_mnist.yaml (small_resnet 16-32-64-128, SEED's loss);
# 3. the same student trained by SimCLR (configs/simclr_fashion_mnist.yaml with the student's backbone), at the same
#    epochs, batch, views, optimiser and seed;
# 4. `selfsup evaluate --protocol knn,linear` on each (teacher included), each table written to RUN/eval.txt and
#    printed together at the end.
set -euo pipefail
cd "$(dirname "$0")/../.."

SELFSUP=${SELFSUP:-.venv/bin/selfsup}
OUT=${OUT:-runs/distill_bench}
DATA=${DATA:-fashion-mnist}
EPOCHS=${EPOCHS:-8}                 # the student's, both ways
BATCH=${BATCH:-256}
TEACHER_EPOCHS=${TEACHER_EPOCHS:-8}
TEACHER_RECIPE=${TEACHER_RECIPE:-configs/essl_fashion_mnist.yaml}
SEED=${SEED:-0}
THREADS=${THREADS:-}
TEACHER=${TEACHER:-}

common=(--data "$DATA" --seed "$SEED" --no-progress)
[[ -n "$THREADS" ]] && common+=(--threads "$THREADS")
student=(--set 'backbone.params.widths=[16,32,64,128]' --set backbone.params.stem_stride=2
         --set backbone.params.pool_grid=2)

if [[ -z "$TEACHER" ]]; then
  TEACHER=$OUT/teacher
  "$SELFSUP" pretrain --config "$TEACHER_RECIPE" "${common[@]}" --epochs "$TEACHER_EPOCHS" --out "$TEACHER"
fi
"$SELFSUP" pretrain --config configs/distill_fashion_mnist.yaml --teacher "$TEACHER" "${common[@]}" "${student[@]}" \
  --epochs "$EPOCHS" --batch-size "$BATCH" --out "$OUT/distill"
"$SELFSUP" pretrain --config configs/simclr_fashion_mnist.yaml "${common[@]}" "${student[@]}" \
  --epochs "$EPOCHS" --batch-size "$BATCH" --out "$OUT/simclr"

runs=("$OUT/distill" "$OUT/simclr")
[[ -d "$TEACHER" ]] && runs=("$TEACHER" "${runs[@]}")   # an exported teacher file has no run to evaluate
for run in "${runs[@]}"; do
  eval_args=()
  [[ -n "$THREADS" ]] && eval_args+=(--threads "$THREADS")
  "$SELFSUP" evaluate "$run" --protocol knn,linear --seed "$SEED" "${eval_args[@]}" | tee "$run/eval.txt"
done
for run in "${runs[@]}"; do
  echo "== $run"
  cat "$run/eval.txt"
done
