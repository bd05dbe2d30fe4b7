#!/usr/bin/env bash
# Build an estimator for a model: collect ablation ground truth -> train -> evaluate -> push.
#
#   bash examples/train_estimator.sh                                   # the bundled toy model, CPU, ~1 min
#   MODEL=Qwen/Qwen3-VL-2B-Thinking PROMPTS=prompts.jsonl IMAGES=imgs/ \
#   REPO_ID=<your-org>/qwen3-vl-2b-thinking-vattr bash examples/train_estimator.sh
#
# PROMPTS is JSON lines ({"image": "file.jpg", "prompt": "question"}; see `hf-vattr collect --help`).
# The collection is resumable: rerun the same command after an interruption.
set -euo pipefail

OUT=${OUT:-runs/estimator-example}
N=${N:-64}                     # toy examples when no PROMPTS are given
K=${K:-16}                     # regions per image
REGIONS=${REGIONS:-vlm}        # grid | vlm | dinov3 | auto | slic

if [[ -n "${PROMPTS:-}" ]]; then
    source_args=(--model "$MODEL" --prompts "$PROMPTS" ${IMAGES:+--images-dir "$IMAGES"} --device-map auto)
else
    source_args=(--toy "$N" ${MODEL:+--model "$MODEL"})
fi

hf-vattr collect "${source_args[@]}" --out "$OUT/ground-truth" --region-method "$REGIONS" --k "$K" \
    --num-subsets 32 --max-new-tokens "${MAX_NEW_TOKENS:-256}"
hf-vattr train "$OUT/ground-truth" --out "$OUT/estimator"   # --target auto = both (subsets collected)
hf-vattr eval "$OUT/ground-truth" --estimator "$OUT/estimator" --with-model \
    --methods estimator,raw_attention,leave_one_out --json "$OUT/eval.json"

if [[ -n "${REPO_ID:-}" ]]; then
    hf-vattr push "$OUT/estimator" "$REPO_ID"   # needs `huggingface-cli login` (or HF_TOKEN)
fi
