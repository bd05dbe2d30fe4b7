"""What total answer effects cost: collection with the reasoning regenerated per mask vs teacher-forced.

    python benchmarks/bench_answer_effects.py --examples 20 --write-docs

On the bundled toy (the one model here whose reasoning is real), each example is collected twice,
``answer_effects="direct"`` then ``"total"``, alternating so both routes see the same machine load;
the figure is process CPU time with one thread. It also reports how many masks changed an answer's
effect (a regenerated reasoning that differs from the original; the others cost no extra forward).
``--write-docs`` replaces the section between the markers in ``docs/collection.md``.
"""

from __future__ import annotations

import argparse
import platform
import re
import time
from pathlib import Path

import numpy as np
import torch

from hf_vattr.pipeline.collection import CollectionConfig, collect_example
from hf_vattr.pipeline.datasets import DatasetSpec
from hf_vattr.toy import load_toy_model

DOCS = Path(__file__).resolve().parents[1] / "docs" / "collection.md"
START, END = "<!-- bench_answer_effects:start -->", "<!-- bench_answer_effects:end -->"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--examples", type=int, default=20)
    p.add_argument("--seed", type=int, default=7002, help="toy dataset seed (the faithfulness test seed)")
    p.add_argument("--write-docs", action="store_true")
    args = p.parse_args(argv)

    torch.set_num_threads(1)
    model, processor = load_toy_model()
    spec = DatasetSpec("toy", n=args.examples, seed=args.seed)
    base = dict(region_method="vlm", k=16, max_new_tokens=96, num_subsets=32)
    times = {"direct": [], "total": []}
    changed, masks, answers = 0, 0, 0
    collect_example(model, processor, *spec.get(0), CollectionConfig(**base))  # warm-up
    for i in range(args.examples):
        records = {}
        for route in ("direct", "total"):
            start = time.process_time()
            records[route] = collect_example(model, processor, *spec.get(i), CollectionConfig(**base, answer_effects=route),
                                             example_id=i)
            times[route].append(time.process_time() - start)
        d, t = records["direct"], records["total"]
        for s, span in enumerate(d.spans):
            if span["section"] == "answer":
                answers += 1
                both = lambda r: torch.cat([r.loo_effects[s], r.subset_effects[s]])  # noqa: E731
                masks += both(d).numel()
                changed += int((both(d) != both(t)).sum())
    direct, total = np.mean(times["direct"]), np.mean(times["total"])
    ratios = np.array(times["total"]) / np.array(times["direct"])
    lines = [
        f"Reproduce with `python benchmarks/bench_answer_effects.py --examples {args.examples} --write-docs`.",
        "",
        f"Bundled toy, {args.examples} examples (seed {args.seed}), K = 16 `vlm` regions, 32 random subsets "
        f"(48 masks per example), {answers} answer spans; process CPU time, 1 thread, {platform.machine()}, "
        f"torch {torch.__version__}. Each example is collected with both settings back to back.",
        "",
        "| answer_effects | s / example (mean) | ratio to direct (median of per-example ratios) |",
        "|---|---:|---:|",
        f"| direct (teacher-forced) | {direct:.2f} | 1.00 |",
        f"| total (reasoning regenerated) | {total:.2f} | {np.median(ratios):.2f} (range {ratios.min():.2f}-{ratios.max():.2f}) |",
        "",
        f"Masks whose answer effect changed (their regenerated reasoning differs from the original): "
        f"{changed} of {masks} ({100 * changed / max(masks, 1):.0f}%).",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write_docs:
        doc = DOCS.read_text()
        block = f"{START}\n{text}\n{END}"
        doc = re.sub(re.escape(START) + r".*?" + re.escape(END), block, doc, flags=re.S) if START in doc \
            else doc.rstrip("\n") + "\n\n## Benchmark: total answer effects\n\n" + block + "\n"
        DOCS.write_text(doc)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
