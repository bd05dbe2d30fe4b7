"""Build the toy model's estimator with the project's own pipeline, and report its faithfulness.

One command reproduces both the shipped estimator and ``docs/faithfulness.md``:

    python scripts/toy/faithfulness.py            # collect -> train -> ship -> evaluate -> report
    python scripts/toy/faithfulness.py --task video   # the video toy: toy-estimator-video, faithfulness-video.md

A development script (outside the wheel): it overwrites the estimator that ships in the package.

Steps (each the same code the CLI runs):

1. collect ablation ground truth on ``--train`` toy examples (a seed the toy model was not
   trained on) with ``hf_vattr.pipeline.collection.collect``;
2. fit a ``LinearEstimator`` (negative-Pearson loss, held-out split by example) and save it
   into the package (``toy/assets/toy-estimator``) with its model card;
3. collect ``--test`` fresh examples (another seed) and evaluate the estimator against raw
   attention, exhaustive leave-one-out, gradient x input, integrated gradients and random
   scores with ``hf_vattr.pipeline.evaluation.evaluate``; plus **pointing accuracy**, which the toy
   task makes possible: for each thinking step that names an object, does the top-1 region
   overlap that object's pixels?
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from hf_vattr.pipeline.baselines import make_method
from hf_vattr.pipeline.collection import CollectionConfig, DecodedVideo, _build_inputs, collect, load_collection
from hf_vattr.pipeline.datasets import DatasetSpec
from hf_vattr.pipeline.evaluation import evaluate
from hf_vattr.regions import PromptRegions
from hf_vattr.toy import (evidence_for_step, example_seed, load_toy_model, make_example, region_on_evidence,
                          toy_checkpoint_path)
from hf_vattr.toy import hard_task, video_task
from hf_vattr.pipeline.training import TrainingConfig, fit_estimator

__all__ = ["main", "pointing_accuracy", "metrics_by_section"]

TRAIN_SEED = 7001
TEST_SEED = 7002
REGION_METHOD = "vlm"  # the VLM's own vision features + Ward: semantic regions, no extra weights
#: Video clips: a 3 x 3 grid per frame group, one region per cell and group. Every toy object sits in one
#: cell, so a region is "this cell at this time"; untrained, grid regions pointed better than prefill Ward.
VIDEO_REGION_METHOD, VIDEO_K = "grid", 9
MIN_EFFECT = 1e-3  # nats: spans below it have no measurable effect (see metrics_by_section)


class VideoClips:
    """The video toy's clips as collection items ``(id, [video], messages)``, built lazily.

    The CLI's toy dataset has image families only; this is the same idea for clips, each going to the
    processor as its frames with their metadata (every frame kept).
    """

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed = n, seed

    def get(self, example_id: int) -> tuple[list, list[dict]]:
        ex = video_task.make_video_example(example_seed(self.seed, int(example_id)))
        video = DecodedVideo(ex.frames, ex.video_metadata, f"toy clip {example_id} (seed {self.seed})")
        return [video], video_task.video_prompt_messages(ex)

    def items(self) -> "VideoClips":
        return self

    def __iter__(self):
        return ((i, *self.get(i)) for i in range(self.n))

    def __len__(self) -> int:
        return self.n


def pointing_accuracy(records: list, scores: dict[str, list[torch.Tensor]], seed: int,
                      task: str = "default") -> dict[str, dict]:
    """Per method: fraction of thinking steps with known evidence whose top-1 region overlaps it.

    A step's evidence is the object it names, or (hard task) the union of every object it covers:
    the top region must lie on one of them. On a video the object must be there in the step's frame group.
    """
    build, evidence_of, on_evidence = {
        "hard": (hard_task.make_hard_example, hard_task.evidence_for_step, region_on_evidence),
        "video": (video_task.make_video_example, video_task.video_evidence_for_step, video_task.region_on_evidence),
    }.get(task, (make_example, evidence_for_step, region_on_evidence))

    hits: dict[str, list[bool]] = {name: [] for name in scores}
    measurable: list[bool] = []  # the step's largest single-region effect is >= MIN_EFFECT nats
    for index, record in enumerate(records):
        example = build(example_seed(seed, int(record.example_id)))
        regions = PromptRegions.from_dict(record.regions)
        for s, span in enumerate(record.spans):
            if span["section"] != "thinking":
                continue
            evidence = evidence_of(example, span["text"])
            if evidence is None:
                continue
            measurable.append(float(record.loo_effects[s].abs().max()) >= MIN_EFFECT)
            for name, per_example in scores.items():
                top = int(torch.argmax(torch.as_tensor(per_example[index][s])))
                hits[name].append(on_evidence(regions, top, evidence))
    keep = np.asarray(measurable, dtype=bool)
    out = {}
    for name, h in hits.items():
        h = np.asarray(h, dtype=bool)
        out[name] = {"pointing": float(h.mean()) if h.size else None, "steps": int(h.size),
                     "pointing_measurable": float(h[keep].mean()) if keep.any() else None,
                     "steps_measurable": int(keep.sum())}
    return out


def metrics_by_section(records: list, per_span: dict[str, dict[str, list]]) -> dict[str, dict[str, dict]]:
    """Per method and span section (``thinking`` / ``answer``): mean LDS and Pearson, and span count.

    ``per_span[method][metric]`` holds one value per span of ``records``, in order: the
    ``EvalReport.per_span`` that :func:`hf_vattr.pipeline.evaluation.evaluate` returns.

    Why: in this task the answer follows from the thinking text, so ablating an image region
    moves the answer span far less (tenths of a nat) than the thinking steps (nats to tens of
    nats). Averaging the two hides how each behaves.
    """
    sections = np.array([str(span["section"]) for r in records for span in r.spans])
    # A span whose largest single-region effect is below MIN_EFFECT nats has no effect to rank (a
    # confident answer's log-prob sits at float32 rounding): it is left out of the section means.
    measurable = np.array([float(r.loo_effects[i].abs().max()) >= MIN_EFFECT
                           for r in records for i in range(r.num_spans)])
    out: dict[str, dict[str, dict]] = {}
    for name, metrics in per_span.items():
        out[name] = {}
        for section in sorted(set(sections), reverse=True):
            mask = (sections == section) & measurable
            row = {"spans": int((sections == section).sum()), "measurable": int(mask.sum())}
            for metric in ("lds", "pearson"):
                values = np.asarray(metrics[metric], dtype=float)[mask]
                row[metric] = float(np.nanmean(values)) if np.isfinite(values).any() else None
            out[name][section] = row
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/toy/faithfulness.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train", type=int, default=400, help="toy examples for estimator training")
    p.add_argument("--test", type=int, default=100, help="fresh toy examples for the report")
    p.add_argument("--task", default="default", choices=("default", "hard", "video"),
                   help="toy task family (hard: more objects, salient distractors, multi-object steps; video: "
                        "clips whose objects move, appear or disappear)")
    p.add_argument("--work", default=None, help="collections go here (default: runs/toy-faithfulness[-hard])")
    p.add_argument("--model", default=None, help="toy checkpoint folder (default: the shipped one of --task)")
    p.add_argument("--estimator-out", default=None,
                   help="default: hf_vattr/toy/assets/toy-estimator (hard task: toy-estimator-hard)")
    p.add_argument("--report", default=None, help="default: docs/faithfulness.md (hard task: docs/faithfulness-hard.md)")
    p.add_argument("--answer-effects", default="total", choices=("direct", "total"),
                   help="ground truth of answer spans (CollectionConfig.answer_effects): total regenerates the "
                        "reasoning under each ablation")
    p.add_argument("--num-subsets", type=int, default=32)
    p.add_argument("--k", type=int, default=None,
                   help="regions per image (default 16), or per frame group of a video (default 9: its 3 x 3 cells)")
    p.add_argument("--ig-steps", type=int, default=16, help="integrated-gradients steps (the costliest baseline)")
    p.add_argument("--feature-kind", default="value_norm", choices=("attention", "value_norm"),
                   help="what the estimator's features pool (CollectionConfig.feature_kind)")
    p.add_argument("--methods", nargs="+", default=["estimator", "raw_attention", "leave_one_out", "grad_x_input",
                                                    "integrated_gradients", "random"], help="methods to report")
    args = p.parse_args(argv)
    suffix = "" if args.task == "default" else f"-{args.task}"
    args.work = args.work or f"runs/toy-faithfulness{suffix}"
    args.report = args.report or f"docs/faithfulness{suffix}.md"

    torch.manual_seed(0)
    t0 = time.perf_counter()
    if args.model:
        from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

        model = Qwen3VLForConditionalGeneration.from_pretrained(args.model).eval()
        processor = AutoProcessor.from_pretrained(args.model)
    else:
        model, processor = load_toy_model(task=args.task)
    work = Path(args.work)
    video = args.task == "video"
    region_method = VIDEO_REGION_METHOD if video else REGION_METHOD
    k = args.k or (VIDEO_K if video else 16)
    config = CollectionConfig(num_subsets=args.num_subsets, max_new_tokens=96, region_method=region_method,
                              k=k, seed=0, feature_kind=args.feature_kind, answer_effects=args.answer_effects)
    if video:
        train_set, test_set = VideoClips(args.train, TRAIN_SEED), VideoClips(args.test, TEST_SEED)
    else:
        task = {} if args.task == "default" else {"task": args.task}
        train_set = DatasetSpec("toy", n=args.train, seed=TRAIN_SEED, **task)
        test_set = DatasetSpec("toy", n=args.test, seed=TEST_SEED, **task)  # the CLI's toy dataset: same examples
    written = collect(model, processor, train_set.items(), work / "train", config)["written"]
    written += collect(model, processor, test_set.items(), work / "test", config)["written"]
    t_collect = time.perf_counter() - t0

    train_records = load_collection(work / "train")
    estimator, report = fit_estimator(
        train_records, config=TrainingConfig(target="both", val_fraction=0.2, seed=0),
        model_type=model.config.model_type, base_model_id=f"hf_vattr/toy-qwen3-vl{suffix} (bundled)",
        region_method=region_method, k_policy={"k": k},
        extra_training_data={"dataset": f"hf_vattr toy task ({args.task}), seed {TRAIN_SEED}, {args.train} examples",
                             "answer_effects": args.answer_effects},
    )
    test_records = load_collection(work / "test")
    options = {"integrated_gradients": {"steps": args.ig_steps}}
    methods = [make_method(name, estimator=estimator, **options.get(name, {})) for name in args.methods]

    def inputs_fn(record):
        return _build_inputs(processor, *test_set.get(int(record.example_id)))

    ev = evaluate(methods, test_records, model, processor, keep_scores=True, progress=True, inputs_fn=inputs_fn)
    pointing = pointing_accuracy(test_records, ev.info["scores"], TEST_SEED, args.task)
    by_section = metrics_by_section(test_records, ev.per_span)
    for name, row in ev.rows.items():
        row["pointing"] = pointing.get(name, {}).get("pointing")

    metrics = dict(estimator.training_metrics or {})
    test_row = ev.rows["estimator"]
    metrics.update({f"test_{k}": v for k, v in test_row.items()
                    if k in ("lds", "r2", "r2_calibrated", "pearson", "top1_drop", "top3_drop", "pointing")
                    and v is not None})
    estimator.set_training_info(training_metrics=metrics)
    est_out = (Path(args.estimator_out) if args.estimator_out
               else Path(toy_checkpoint_path()).parent / f"toy-estimator{suffix}")
    estimator.save_pretrained(est_out)

    table = ev.to_markdown()
    fmt = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
    on = "on any object the step covers" if args.task == "hard" else "on the step's object"
    ptable = [f"| Method | Pointing (top-1 region {on}) | steps | Pointing, steps with an effect >= {MIN_EFFECT:g} nats "
              "| steps |", "|---|---:|---:|---:|---:|"]
    for name in ev.rows:
        v = pointing.get(name, {})
        ptable.append(f"| {name} | {fmt(v.get('pointing'))} | {v.get('steps', 0)} | {fmt(v.get('pointing_measurable'))} "
                      f"| {v.get('steps_measurable', 0)} |")
    stable = ["| Method | LDS, thinking steps | LDS, answer | Pearson, thinking steps | Pearson, answer |",
              "|---|---:|---:|---:|---:|"]
    for name, sections in by_section.items():
        th, an = sections.get("thinking", {}), sections.get("answer", {})
        stable.append(f"| {name} | {fmt(th.get('lds'))} | {fmt(an.get('lds'))} | {fmt(th.get('pearson'))} "
                      f"| {fmt(an.get('pearson'))} |")
    span_counts = ", ".join(f"{row['spans']} {sec} ({row['measurable']} with an effect >= {MIN_EFFECT:g} nats)"
                            for sec, row in next(iter(by_section.values())).items())
    effect_size = {}  # mean over spans of the largest single-region leave-one-out effect (nats)
    for record in test_records:
        for s_idx, span in enumerate(record.spans):
            effect_size.setdefault(str(span["section"]), []).append(float(record.loo_effects[s_idx].abs().max()))
    effect_size = {sec: float(np.mean(v)) for sec, v in effect_size.items()}
    loo = ev.rows.get("leave_one_out", {})
    est = ev.rows["estimator"]
    raw = ev.rows.get("raw_attention", {})
    ig = ev.rows.get("integrated_gradients", {})
    est_answer = by_section.get("estimator", {}).get("answer", {}).get("pearson")
    compared = ("lds", "top1_drop", "top3_drop", "top5_drop", "r2", "pearson", "pointing")
    beaten = [m for m in compared if est.get(m) is not None and raw.get(m) is not None and est[m] > raw[m]]
    cost = {name: row.get("time_per_span_ms") for name, row in ev.rows.items()}
    cheap = all(cost.get(n) and cost.get("estimator") is not None and cost["estimator"] < 0.01 * cost[n]
                for n in ("leave_one_out", "integrated_gradients") if n in cost)
    targets = [
        ("estimator R^2 >= 0.70", est.get("r2") is not None and est["r2"] >= 0.70, fmt(est.get("r2"))),
        ("estimator LDS >= 90% of leave-one-out's (all spans)",
         est.get("lds") is not None and loo.get("lds") is not None and est["lds"] >= 0.9 * loo["lds"],
         f"{fmt(est.get('lds'))} vs {fmt(loo.get('lds'))}"
         + (f" ({100 * est['lds'] / loo['lds']:.0f}%)" if est.get("lds") and loo.get("lds") else "")),
        ("estimator answer-span Pearson >= 0.5", est_answer is not None and est_answer >= 0.5, fmt(est_answer)),
        ("estimator pointing >= 0.95", est.get("pointing") is not None and est["pointing"] >= 0.95,
         f"{fmt(est.get('pointing'))} ({fmt(pointing.get('estimator', {}).get('pointing_measurable'))} on steps "
         "with an effect)"),
        ("estimator LDS above raw attention and integrated gradients",
         est.get("lds") is not None and all(row.get("lds") is not None and est["lds"] > row["lds"]
                                            for row in (raw, ig) if row or args.task != "video"),
         f"{fmt(est.get('lds'))} vs {fmt(raw.get('lds'))} / {fmt(ig.get('lds'))}"),
        ("... at < 1% of the cost of leave-one-out and integrated gradients", cheap,
          ", ".join(f"{n} {cost[n]:.3g} ms" for n in ("estimator", "leave_one_out", "integrated_gradients")
                   if cost.get(n) is not None)),
        ("estimator better than raw attention on every metric", len(beaten) == len(compared),
         f"better on {len(beaten)}/{len(compared)}: " + ", ".join(beaten)),
    ]
    inheritance = report.get("inheritance", {})
    if inheritance.get("applied"):
        chosen = next(t for t in inheritance["tried"]
                      if (t["pool"], t["decay"]) == (inheritance["pool"], inheritance["decay"]))
        pooled = ("max of the steps' positive scores" if inheritance["pool"] == "max" else
                  f"recency-weighted mean of the steps' positive scores (decay {inheritance['decay']:g})")
        inherit_md = (
            f"Answers inherit the thinking steps' scores: `answer = {inheritance['own']:.3g} x own + "
            f"{inheritance['weight']:.3g} x {pooled}` (fit on the training split, pool and decay chosen on the "
            f"held-out split among {len(inheritance['tried'])} candidates, where the answers' Pearson is "
            f"{chosen['answer_pearson']:.3f} with inheritance and {chosen['answer_pearson_own']:.3f} with their own "
            "attention only).")
    else:
        inherit_md = "Answers are scored by their own attention only (no inheritance was fit)."
    elapsed = time.perf_counter() - t0
    reproduce = "python scripts/toy/faithfulness.py" + ("" if args.task == "default" else f" --task {args.task}")
    for name in ("train", "test", "methods"):  # sizes and methods that differ from the defaults
        value = getattr(args, name)
        if value != p.get_default(name):
            reproduce += f" --{name} " + (" ".join(value) if isinstance(value, list) else str(value))
    answers_md = (
        "Answer spans are measured with **total** effects: each ablation's reasoning is regenerated under the "
        "ablation and the original answer is scored after it, so the path from the image through the thinking "
        "text counts (teacher forcing would keep the text and hide it)."
        if args.answer_effects == "total" else
        "Answer spans are measured teacher-forced (the thinking text kept), which hides the path from the image "
        "through the reasoning.")
    reused = ("" if len(written) == args.train + args.test else
              f"; {args.train + args.test - len(written)} examples were already collected in the work folder")
    md = [
        f"# Faithfulness on the toy thinking VLM{ {'hard': ' (hard task)', 'video': ' (video task)'}.get(args.task, '')}",
        "",
        f"Reproduce (rebuilds the shipped estimator too): `{reproduce}`",
        "",
        f"Model: the bundled toy Qwen3-VL (`hf_vattr/toy/assets/toy-qwen3-vl{suffix}`). Regions: "
        + (f"`{region_method}` (K = {k} per frame group: one region per cell of the 3 x 3 layout and frame group)."
           if video else f"`{region_method}` (the model's own vision features + Ward, K = {k}).")
        + f" Estimator (`{args.feature_kind}` features) "
        f"trained on {args.train} toy examples (seed {TRAIN_SEED}; 20% of them held out for early metrics), "
        f"evaluated on {args.test} fresh examples (seed {TEST_SEED}), {args.num_subsets} random ablation subsets per "
        "example (keep probability 0.5), ablation = knocking the region's visual tokens out of attention. "
        f"{answers_md} Total time {elapsed / 60:.1f} min on this CPU, {torch.get_num_threads()} torch thread(s) "
        f"(collection {t_collect / 60:.1f} min{reused}).",
        "",
        inherit_md,
        "",
        f"`raw_attention` is the estimator's own features (`{args.feature_kind}`) averaged over layers and heads, "
        "untrained.",
        "",
        "## Methods x metrics (test examples)",
        "",
        table,
        "",
        "## Pointing accuracy",
        "",
        *ptable,
        "",
        "## By span section",
        "",
        f"Spans: {span_counts}. Largest single-region leave-one-out effect, mean over spans (nats): "
        + ", ".join(f"{sec} {v:.4f}" for sec, v in sorted(effect_size.items(), reverse=True))
        + ". Section means leave out spans without a measurable effect; the all-span means above include every span.",
        "",
        *stable,
        "",
        "## Targets",
        "",
        "| target | met | value |",
        "|---|---|---|",
        *[f"| {name} | {'yes' if ok else 'no'} | {val} |" for name, ok, val in targets],
        "",
        "R^2 is the raw coefficient of determination of the (calibrated) estimator scores against the measured "
        "leave-one-out effects; `r2_calibrated` is Pearson^2 (after a least-squares line). Top-k drop is the "
        "measured log-probability drop of the span when the method's top-k regions are ablated together.",
    ]
    Path(args.report).parent.mkdir(parents=True, exist_ok=True)
    Path(args.report).write_text("\n".join(md) + "\n")
    (work / "faithfulness.json").write_text(json.dumps({"rows": ev.rows, "pointing": pointing,
                                                        "by_section": by_section,
                                                        "training": report.get("metrics"),
                                                        "inheritance": report.get("inheritance")},
                                                       indent=2, default=float))
    print("\n".join(md))
    print(f"\nestimator saved to {est_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
