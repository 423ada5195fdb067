#!/bin/bash
# One recipe-screen row: pretrain the SimCLR recipe with overrides on the first LIMIT images for EPOCHS,
# then evaluate kNN and linear probe on the Fashion-MNIST test set (with both baselines), and append a
# JSON line to results.jsonl. Run from the repository root:
#   benchmarks/recipe_screen/screen.sh NAME LIMIT EPOCHS [pretrain flags…]
# e.g.  benchmarks/recipe_screen/screen.sh K 20000 3 --set optim.lr=1.2
set -euo pipefail
NAME=$1; LIMIT=$2; EP=$3; shift 3
DIR=runs/recipe_screen
mkdir -p "$DIR"
S=$(date +%s)
.venv/bin/selfsup pretrain --config configs/simclr_fashion_mnist.yaml --out "$DIR/$NAME" --overwrite \
  --limit "$LIMIT" --epochs "$EP" --no-progress "$@" > "$DIR/$NAME.log" 2>&1
T=$(date +%s)
.venv/bin/selfsup evaluate "$DIR/$NAME" --protocol knn,linear --json > "$DIR/$NAME.eval.json" 2>> "$DIR/$NAME.log"
.venv/bin/python - "$NAME" "$*" $((T - S)) "$DIR/$NAME.eval.json" <<'PY' >> "$DIR/results.jsonl"
import json, sys
name, args, train_s, path = sys.argv[1:5]
rows = json.load(open(path))
rows = rows if isinstance(rows, list) else [rows]
out = {"name": name, "args": args, "train_s": int(train_s)}
for r in rows:  # [selfsup, random encoder, raw pixels]
    out[r["protocol"]] = [round(r["accuracy"], 4), round(r["baselines"]["random_encoder"], 4),
                          round(r["baselines"]["raw_pixels"], 4)]
print(json.dumps(out))
PY
tail -1 "$DIR/results.jsonl"
