#!/bin/bash
# The final recipe as `make demo` runs it (issue #20): pretrain with the config,
# then `selfsup evaluate RUN --protocol knn,linear` on the test set beside the baselines, on THREADS threads
# (default: 1; on a shared machine 2 threads spin-wait for each other). One seed per call;
# wall and CPU time of each half go to DIR/NAME.{pretrain,eval}.time ("wall user sys"), /proc/loadavg beside.
#   benchmarks/recipe_screen/final_demo.sh NAME CONFIG [pretrain flags…]    e.g. … essl_s1 configs/essl_fashion_mnist.yaml --set train.seed=1
set -euo pipefail
NAME=$1; CONFIG=$2; shift 2
PY=${PY:-.venv/bin/python}
DIR=runs/recipe_final
mkdir -p "$DIR"
cat /proc/loadavg > "$DIR/$NAME.loadavg"
/usr/bin/time -f "%e %U %S" -o "$DIR/$NAME.pretrain.time" \
  "$PY" -m selfsup pretrain --config "$CONFIG" --out "$DIR/$NAME" --overwrite --no-progress --threads "${THREADS:-1}" "$@" > "$DIR/$NAME.pretrain.log" 2>&1
cat /proc/loadavg >> "$DIR/$NAME.loadavg"
/usr/bin/time -f "%e %U %S" -o "$DIR/$NAME.eval.time" \
  "$PY" -m selfsup evaluate "$DIR/$NAME" --protocol knn,linear --threads "${THREADS:-1}" --json > "$DIR/$NAME.eval.json" 2> "$DIR/$NAME.eval.log"
cat /proc/loadavg >> "$DIR/$NAME.loadavg"
