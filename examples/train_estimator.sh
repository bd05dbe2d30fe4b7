#!/usr/bin/env bash
# Build an estimator for a model: collect ablation ground truth -> train -> evaluate -> model card -> push.
#
#   bash examples/train_estimator.sh                                   # the bundled toy model, CPU, ~1 min
#   MODEL=Qwen/Qwen3-VL-2B-Thinking DATASET=lmms-lab/ChartQA SPLIT=test IMAGE_COLUMN=image \
#   QUESTION_COLUMN=question LIMIT=1000 DEVICE_MAP=auto \
#   REPO_ID=<your-org>/qwen3-vl-2b-thinking-vattr bash examples/train_estimator.sh
#
# DATASET is anything `datasets.load_dataset` reads (Hub id, local parquet / json / imagefolder folder) or a
# save_to_disk folder; PROMPTS=file.jsonl (+ IMAGES=dir) is the JSON-lines alternative (`hf-vattr collect --help`).
# The steps are examples/train_estimator.py (which prints each `hf-vattr` command as it runs it).
# The collection is resumable: rerun the same command after an interruption.
set -euo pipefail

args=(--out "${OUT:-runs/estimator-example}" --n "${N:-64}" --k "${K:-16}" --regions "${REGIONS:-vlm}"
      --num-subsets "${NUM_SUBSETS:-32}" --max-new-tokens "${MAX_NEW_TOKENS:-256}")
[[ -n "${MODEL:-}" ]] && args+=(--model "$MODEL")
if [[ -n "${DATASET:-}" ]]; then
    args+=(--dataset "$DATASET" --split "${SPLIT:-train}" --image-column "${IMAGE_COLUMN:-image}"
           --question-column "${QUESTION_COLUMN:-question}")
    [[ -n "${DATASET_CONFIG:-}" ]] && args+=(--dataset-config "$DATASET_CONFIG")
    [[ -n "${ID_COLUMN:-}" ]] && args+=(--id-column "$ID_COLUMN")
    [[ -n "${SYSTEM_PROMPT:-}" ]] && args+=(--system-prompt "$SYSTEM_PROMPT")
elif [[ -n "${PROMPTS:-}" ]]; then
    args+=(--prompts "$PROMPTS")
    [[ -n "${IMAGES:-}" ]] && args+=(--images-dir "$IMAGES")
fi
[[ -n "${LIMIT:-}" ]] && args+=(--limit "$LIMIT")
[[ -n "${DEVICE_MAP:-}" ]] && args+=(--device-map "$DEVICE_MAP")
[[ -n "${REPO_ID:-}" ]] && args+=(--repo-id "$REPO_ID")   # push needs `hf auth login` (or HF_TOKEN)

exec python "$(dirname "$0")/train_estimator.py" "${args[@]}"
