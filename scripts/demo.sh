#!/usr/bin/env bash
# The main job on the embedded default (CPU, ONNX Runtime), from nothing to a validated box:
# set up → synthetic VinDr-SpineXR set → train (cpu profile) → export → build engines → infer → bench.
# Everything lands in demo/ (data, checkpoints, outputs) and runs/bundle (the default bundle), so
# afterwards `spine-edge build-engines`, `spine-edge infer FOLDER` and `spine-edge bench` work as typed.
set -euo pipefail
cd "$(dirname "$0")/.."
DEMO=${DEMO_DIR:-demo}
N_TRAIN=${N_TRAIN:-350}
N_TEST=${N_TEST:-100}
# About 100 validation images, as many as the test split: export's verdicts (validation) and bench's
# (test) then rest on intervals of the same width, and a 5 % flip gate allows 5 flips, not 2.
VAL_FRACTION=${VAL_FRACTION:-0.3}
SCALE=${SCALE:-0.35}
start=$(date +%s)
stage() { printf '\n\033[1m==> [%4ss] %s\033[0m\n' "$(( $(date +%s) - start ))" "$*"; }

stage "setup (.venv, spine-edge[train,dev,serve,dicom,explain,openvino])"
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"

stage "synthetic VinDr-SpineXR set: $N_TRAIN train + $N_TEST test DICOMs (JPEG 2000) in $DEMO/vindr"
rm -rf "$DEMO"
spine-edge data synth "$DEMO/vindr" --n-train "$N_TRAIN" --n-test "$N_TEST" --scale "$SCALE" --seed 0
spine-edge data check "$DEMO/vindr"

stage "training cache (PNG + YOLO labels, study-level split) in $DEMO/prepared"
spine-edge data prepare "$DEMO/vindr" "$DEMO/prepared" --long-side 512 --val-fraction "$VAL_FRACTION"

stage "train the cpu profile: 3 classifiers -> ensemble (weights, tau) -> YOLO11n"
spine-edge train all --profile cpu --data "$DEMO/prepared" --out "$DEMO/checkpoints"

stage "export: fused TTA ensemble + detector, FP32 / FP16 / INT8, accuracy report -> runs/bundle"
# Exit 4 means a precision missed its accuracy gate: the bundle is still written and the report
# says which; bench below measures the same thing on the test split.
spine-edge export "$DEMO/checkpoints" || [ $? -eq 4 ]

stage "build engines for this box (TensorRT if present, else ONNX Runtime CPU)"
spine-edge build-engines

stage "infer on the synthetic test folder"
# Exit 1 (some inputs failed) and 6 (some refused by the input guard) still mean a finished run.
spine-edge infer "$DEMO/vindr/test_images" -o "$DEMO/infer" || { rc=$?; [ "$rc" -eq 1 ] || [ "$rc" -eq 6 ]; }

stage "bench: latency per stage, PyTorch baseline, accuracy hold per precision vs FP32"
spine-edge bench --data "$DEMO/vindr" --checkpoints "$DEMO/checkpoints" --json "$DEMO/bench/report.json" --plots "$DEMO/bench" \
  --save-predictions "$DEMO/bench/predictions" || [ $? -eq 4 ]

stage "done"
cat <<MSG
Outputs:
  results     $DEMO/infer/results.jsonl, $DEMO/infer/results.csv
  overlays    $DEMO/infer/overlays/, heatmaps in $DEMO/infer/heatmaps/
  bundle      runs/bundle/ (manifest.json, accuracy_report.md)
  bench       $DEMO/bench/report.json and PNG plots in $DEMO/bench/
MSG
