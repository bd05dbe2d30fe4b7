"""From zero to an estimator for your model: collect ablation ground truth -> train -> evaluate -> card -> push.

    python examples/train_estimator.py                       # the bundled toy model and task, CPU, ~1 min
    python examples/train_estimator.py --model Qwen/Qwen3-VL-2B-Thinking \
        --dataset lmms-lab/ChartQA --split test --image-column image --question-column question \
        --limit 1000 --repo-id <your-org>/qwen3-vl-2b-thinking-vattr --device-map auto

--dataset is anything `datasets.load_dataset` reads (a Hub id, or a local folder of parquet / json /
imagefolder files) or a folder written by `save_to_disk`; --prompts FILE.jsonl is the JSON-lines
alternative (`hf-vattr collect --help`). Each step is one `hf-vattr` command (printed before it
runs), so the recipe is also what to type by hand. The collection is resumable: rerun the same
command after an interruption. Under `accelerate launch`, run the collect command it prints
instead (each process collects its own shard), then rerun this script to train, evaluate and push.
`train` writes the model card (README.md) into the estimator folder; --repo-id pushes the folder
(needs `hf auth login` or HF_TOKEN). examples/train_estimator.sh runs this script from
environment variables (MODEL=, DATASET=, ...).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="model id or local folder (default: the bundled toy model)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--dataset", default=None, help="`datasets` Hub id or local folder")
    src.add_argument("--prompts", default=None, help="JSON-lines prompts file")
    p.add_argument("--dataset-config", default=None)
    p.add_argument("--split", default="train")
    p.add_argument("--image-column", default="image")
    p.add_argument("--question-column", default="question")
    p.add_argument("--id-column", default=None)
    p.add_argument("--system-prompt", default=None)
    p.add_argument("--images-dir", default=None, help="with --prompts: folder of its images")
    p.add_argument("--limit", type=int, default=None, help="collect only the first N examples")
    p.add_argument("--n", type=int, default=64, help="toy examples when neither --dataset nor --prompts is given")
    p.add_argument("--out", default="runs/estimator-example")
    p.add_argument("--k", type=int, default=16, help="regions per image")
    p.add_argument("--regions", default="vlm", help="region method: grid, vlm, dinov3, auto, slic, ...")
    p.add_argument("--num-subsets", type=int, default=32)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--device-map", default=None, help="e.g. auto for a model larger than one device")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--eval-methods", default="estimator,raw_attention,leave_one_out")
    p.add_argument("--repo-id", default=None, help="Hub repo to push the estimator to (skipped when not given)")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


def commands(a: argparse.Namespace) -> list[list[str]]:
    """The four `hf-vattr` commands of the recipe."""
    out = Path(a.out)
    gt, est = str(out / "ground-truth"), str(out / "estimator")
    model = ["--model", a.model] if a.model else []
    if a.dataset:
        source = ["--dataset", a.dataset, "--split", a.split, "--image-column", a.image_column,
                  "--question-column", a.question_column]
        for flag, value in (("--dataset-config", a.dataset_config), ("--id-column", a.id_column),
                            ("--system-prompt", a.system_prompt)):
            if value is not None:
                source += [flag, value]
    elif a.prompts:
        source = ["--prompts", a.prompts] + (["--images-dir", a.images_dir] if a.images_dir else [])
    else:
        source = ["--toy", str(a.n)]
    load = (["--device-map", a.device_map] if a.device_map else []) + (["--dtype", a.dtype] if a.model else [])
    quiet = ["--quiet"] if a.quiet else []
    collect = ["collect", *model, *source, *load, "--out", gt, "--region-method", a.regions, "--k", str(a.k),
               "--num-subsets", str(a.num_subsets), "--max-new-tokens", str(a.max_new_tokens), *quiet]
    if a.limit:
        collect += ["--limit", str(a.limit)]
    steps = [collect,
             ["train", gt, "--out", est, *quiet],  # --target auto = both (subsets collected); writes README.md
             ["eval", gt, "--estimator", est, "--with-model", *load, "--methods", a.eval_methods,
              "--json", str(out / "eval.json"), *quiet]]
    if a.repo_id:
        steps.append(["push", est, a.repo_id])
    return steps


def main(argv: list[str] | None = None) -> int:
    from hf_vattr.commands.cli import main as hf_vattr

    args = parse_args(argv)
    for cmd in commands(args):
        print("$ hf-vattr " + shlex.join(cmd), flush=True)
        rc = hf_vattr(cmd)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
