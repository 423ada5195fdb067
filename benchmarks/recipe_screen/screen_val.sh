#!/bin/bash
# One row of the held-out screen (issue #20): pretrain a recipe with overrides on all 55,000 pretraining
# images, then kNN and linear probe on the 5,000 images the run held out of pretraining (seed 0's
# data.val_size split), fitted on the other 55,000 labelled training images (`selfsup evaluate --split val`).
# The test split is not touched. Appends a JSON line to runs/recipe_screen_val/results.jsonl.
# Run from the repository root, one row at a time (the machine is shared; one thread per job):
#   benchmarks/recipe_screen/screen_val.sh NAME CONFIG EPOCHS [pretrain flags…]
# e.g.  benchmarks/recipe_screen/screen_val.sh essl_l1 configs/simclr_fashion_mnist.yaml 4 \
#         --method essl --set method.params.rotation_weight=1.0
# BASELINES=1 also measures raw pixels and the random encoder on the same split.
set -euo pipefail
NAME=$1; CONFIG=$2; EP=$3; shift 3
PY=${PY:-.venv/bin/python}
DIR=runs/recipe_screen_val
mkdir -p "$DIR"
/usr/bin/time -f "%e %U %S" -o "$DIR/$NAME.time" \
  "$PY" -m selfsup pretrain --config "$CONFIG" --out "$DIR/$NAME" --overwrite --epochs "$EP" \
  --threads "${THREADS:-1}" --no-progress "$@" > "$DIR/$NAME.log" 2>&1
"$PY" - "$NAME" "$CONFIG" "$EP" "$*" "$DIR" "${BASELINES:-0}" "${THREADS:-1}" <<'PY' >> "$DIR/results.jsonl"
import json, sys, time
import torch
from selfsup.eval.evaluate import evaluate_run
name, config, epochs, args, out, baselines, threads = sys.argv[1:8]
torch.set_num_threads(int(threads))
run = f"{out}/{name}"
wall, user, system = map(float, open(f"{out}/{name}.time").read().split())
t0, c0 = time.perf_counter(), time.process_time()
knn, linear = evaluate_run(run, ["knn", "linear"], split="val", baselines=baselines == "1")
eval_wall, eval_cpu = time.perf_counter() - t0, time.process_time() - c0
epochs_log = [json.loads(l) for l in open(f"{run}/metrics.jsonl") if '"epoch_time_s"' in l]
row = {"name": name, "config": config, "epochs": int(epochs), "args": args,
       "pretrain_wall_s": wall, "pretrain_cpu_s": round(user + system, 1),
       "eval_wall_s": round(eval_wall, 1), "eval_cpu_s": round(eval_cpu, 1),
       "online_knn": [round(e["knn"], 4) for e in epochs_log if e.get("knn") is not None],
       "val_knn": round(knn["accuracy"], 4), "val_linear": round(linear["accuracy"], 4),
       "n_fit": knn["n_train"], "n_val": knn["n_test"]}
if baselines == "1":
    row["baselines"] = {k: [round(knn["baselines"][k], 4), round(linear["baselines"][k], 4)] for k in knn["baselines"]}
print(json.dumps(row))
PY
tail -1 "$DIR/results.jsonl"
