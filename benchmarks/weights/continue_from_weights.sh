#!/bin/bash
# Issue #35: does continued pretraining from weights a user already has beat the same recipe from scratch at equal
# steps? Nothing can be downloaded, so the "weights a user has" are made here: SimCLR pretrained for SOURCE_EPOCHS
# (seed 1), exported in torchvision's layout (`selfsup export --format torchvision`: what a torchvision checkpoint
# looks like). Then the same recipe runs EPOCHS more from that file (`--weights`) and, beside it, EPOCHS from scratch
# (seed 0 both), and `selfsup evaluate --protocol knn,linear` scores each on the test set. Not run by the tests.
#   benchmarks/weights/continue_from_weights.sh                 # Fashion-MNIST, torchvision ResNet-18 (small stem)
#   DATA=digits SOURCE_EPOCHS=1 EPOCHS=1 benchmarks/weights/continue_from_weights.sh --limit 300   # a smoke run
# Environment: DATA (fashion-mnist), BACKBONE (torchvision:resnet18), SOURCE_EPOCHS (5), EPOCHS (5), THREADS (1),
# DIR (runs/continue_from_weights), PY (.venv/bin/python); further arguments go to every `selfsup pretrain`.
# Fair comparison: the continued run's SOURCE_EPOCHS are not counted in "equal steps" (they stand for someone
# else's pretraining); the table also reports the source run itself.
set -euo pipefail
PY=${PY:-.venv/bin/python}
DATA=${DATA:-fashion-mnist}
BACKBONE=${BACKBONE:-torchvision:resnet18}
SOURCE_EPOCHS=${SOURCE_EPOCHS:-5}
EPOCHS=${EPOCHS:-5}
THREADS=${THREADS:-1}
DIR=${DIR:-runs/continue_from_weights}
mkdir -p "$DIR"
common=(--method simclr --data "$DATA" --backbone "$BACKBONE" --threads "$THREADS" --no-progress --overwrite "$@")

"$PY" -m selfsup pretrain "${common[@]}" --epochs "$SOURCE_EPOCHS" --seed 1 --out "$DIR/source" > "$DIR/source.log" 2>&1
"$PY" -m selfsup export "$DIR/source" --format torchvision --out "$DIR/source_weights.pt"

"$PY" -m selfsup pretrain "${common[@]}" --epochs "$EPOCHS" --seed 0 --weights "$DIR/source_weights.pt" \
  --out "$DIR/continued" > "$DIR/continued.log" 2>&1
"$PY" -m selfsup pretrain "${common[@]}" --epochs "$EPOCHS" --seed 0 --out "$DIR/scratch" > "$DIR/scratch.log" 2>&1

for run in source continued scratch; do
  "$PY" -m selfsup evaluate "$DIR/$run" --protocol knn,linear --threads "$THREADS" --json > "$DIR/$run.eval.json" 2> "$DIR/$run.eval.log"
done

"$PY" - "$DIR" "$SOURCE_EPOCHS" "$EPOCHS" <<'PYEOF'
import json, sys
from pathlib import Path

out, source_epochs, epochs = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
rows = {"source": f"source ({source_epochs} epochs, seed 1)", "continued": f"from its weights, +{epochs} epochs",
        "scratch": f"from scratch, {epochs} epochs"}
print("| run | kNN | linear |\n|---|---|---|")
for run, label in rows.items():
    results = json.loads((out / f"{run}.eval.json").read_text())
    results = results if isinstance(results, list) else [results]
    acc = {r["protocol"]: r.get("accuracy") for r in results}
    print(f"| {label} | " + " | ".join(f"{100 * acc[p]:.2f}%" if acc.get(p) is not None else "–" for p in ("knn", "linear")) + " |")
PYEOF
