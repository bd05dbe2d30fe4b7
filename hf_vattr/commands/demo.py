"""`hf-vattr demo`: stream attribution from the bundled toy thinking VLM, offline, on CPU.

Prints the trace as it is generated and, after each finished reasoning step, its top
regions (and whether the top region lands on the object the step talks about: the toy
task knows the right answer). Then writes a self-contained HTML report (hf_vattr.viz: the same
rendering as the notebook view and the web app), one overlay PNG per step, and the trace itself
(``AttributionTrace.load("vattr_report/trace")`` brings it back in a notebook).

``--video`` does the same on a clip of the video toy (objects that move, appear or disappear):
regions are cells per frame group, each step's top regions are named by where and when, the top
region must hold the step's object in the step's frame group, and the report draws filmstrips.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence


from ..toy import toy_estimator_path, toy_regions

__all__ = ["main", "run_demo"]

HELD_OUT_SEED = 20261125  # examples drawn from a seed the toy model never trained on
VIDEO_GRID_K = 9  # regions per frame group without an estimator: the video toy's 3 x 3 cells


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hf-vattr demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=HELD_OUT_SEED, help="toy example seed (held out by default)")
    p.add_argument("--index", type=int, default=0, help="which example of that seed's stream")
    p.add_argument("--out", default="vattr_report.html", help="HTML report path; PNGs go next to it")
    p.add_argument("--top", type=int, default=3, help="regions listed per step")
    p.add_argument("--quiet", action="store_true", help="do not print the trace while it is generated")
    p.add_argument("--no-estimator", action="store_true",
                   help="score with raw value-norm attention (uncalibrated), as before any estimator exists")
    p.add_argument("--video", action="store_true",
                   help="a clip of the video toy (moving, appearing and disappearing objects) with its own model")
    return p


@dataclass
class _Prompt:
    """One toy prompt ready to stream: what the streamer takes, and how to check a step's top region."""

    example: Any
    inputs: Any
    streamer_kwargs: dict
    evidence_for_step: Callable[[Any, str], Any]
    region_on_evidence: Callable[[Any, int, Any], bool]
    title: str
    object_words: str  # how the summary names a hit


def _load_estimator(task: str, *, required: bool):
    """The shipped estimator of `task`, or None where none is shipped and it is not `required`."""
    from ..estimator import LinearEstimator

    est_path = toy_estimator_path(task)
    if not (est_path / "config.json").exists():
        if not required:
            return None
        flag = "" if task == "default" else f" --task {task}"
        raise FileNotFoundError(
            f"The toy estimator is missing at {est_path}. Reinstall hf_vattr, or rebuild it from a source "
            f"checkout with `python scripts/toy/faithfulness.py{flag}`."
        )
    return LinearEstimator.from_pretrained(str(est_path))


def _image_prompt(model, processor, estimator, seed: int, index: int) -> _Prompt:
    from ..toy import evidence_for_step, make_examples, prompt_messages, region_on_evidence

    example = make_examples(1, seed=seed, start=index)[-1]
    images = [example.image]
    prompt = processor.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    regions = toy_regions(model, inputs, images, estimator)
    return _Prompt(example, inputs, dict(images=images, regions=regions), evidence_for_step, region_on_evidence,
                   "hf_vattr demo: toy thinking VLM", "the step's object")


def _video_prompt(processor, estimator, seed: int, index: int) -> _Prompt:
    from ..toy import make_video_examples, video_evidence_for_step, video_prompt_messages
    from ..toy.video_task import region_on_evidence

    example = make_video_examples(1, seed=seed, start=index)[-1]
    prompt = processor.apply_chat_template(video_prompt_messages(example), add_generation_prompt=True,
                                           tokenize=False)
    inputs = processor(text=[prompt], videos=[example.frames], video_metadata=[example.video_metadata],
                       do_sample_frames=False, return_tensors="pt")
    # the regions the estimator was trained on (a grid per frame group), else the toy's cells
    k = (estimator.k_policy or {}).get("k", VIDEO_GRID_K) if estimator is not None else VIDEO_GRID_K
    kwargs = dict(videos=[example.frames], video_metadata=[example.video_metadata], regions="grid", grid_k=k)
    return _Prompt(example, inputs, kwargs, video_evidence_for_step, region_on_evidence,
                   "hf_vattr demo: toy thinking VLM (video)", "the step's object in the step's frame group")


def run_demo(seed: int = HELD_OUT_SEED, index: int = 0, out: str | Path = "vattr_report.html", top: int = 3,
             quiet: bool = False, no_estimator: bool = False, video: bool = False) -> dict:
    """Run the demo and return a summary dict (paths, spans, pointing hits, the trace itself).

    With `video`, a clip of the video toy: its model, and its estimator where one is shipped (without one
    the scores are uncalibrated raw value-norm attention, and the output says so).
    """
    import torch

    from ..streaming.streamer import AttributionStreamer, SpanAttribution, TokenAttribution
    from ..toy import load_toy_model
    from ..viz import (UNCALIBRATED_NOTE, describe_regions, evidence_wording, render_html, save_overlays,
                       span_evidence)

    start = time.perf_counter()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    task = "video" if video else "default"
    model, processor = load_toy_model(task=task)
    estimator = _load_estimator(task, required=not video)  # its regions are used even with no_estimator
    toy = (_video_prompt(processor, estimator, seed, index) if video
           else _image_prompt(model, processor, estimator, seed, index))
    example = toy.example
    streamer = AttributionStreamer(model, processor, inputs=toy.inputs, estimator=None if no_estimator else estimator,
                                   print_text=False, timeout=120, **toy.streamer_kwargs)
    print(f"Question: {example.question}\n")
    if no_estimator or estimator is None:
        why = "" if estimator is not None else " (no estimator is shipped for the video toy yet)"
        print(f"Scores are {UNCALIBRATED_NOTE}{why}.\n")
    hits = []
    at_line_start = True
    # Print from the event stream itself (not the streamer's own printer, which runs in another
    # thread): text and step annotations then come out in generation order.
    for event in streamer.generate(**toy.inputs, max_new_tokens=96, do_sample=False):
        if isinstance(event, TokenAttribution):
            if not quiet and event.text:
                print(event.text, end="", flush=True)
                at_line_start = event.text.endswith("\n")
            continue
        if isinstance(event, SpanAttribution):
            top_ids = event.top_regions(top)
            evidence = toy.evidence_for_step(example, event.text) if event.section == "thinking" else None
            verdict = ""
            if evidence is not None:
                hit = toy.region_on_evidence(streamer.regions, top_ids[0], evidence)
                hits.append(hit)
                verdict = "  [top region on the object: " + ("yes" if hit else "no") + "]"
            if not at_line_start:
                print()
                at_line_start = True
            label = f"step {event.index}" if event.section == "thinking" else "answer"
            evidence = span_evidence(event, streamer.trace)
            note = "" if evidence == "grounded" else f" ({evidence_wording(evidence).caption})"
            note += "" if event.calibrated else " (uncalibrated)"
            print(f"    -> {label}{note}: top regions {describe_regions(streamer.regions, top_ids)}{verdict}",
                  flush=True)
    streamer.join()
    out = Path(out)
    png_dir = out.with_suffix("")
    pngs = save_overlays(streamer.trace, out_dir=png_dir, top=top)
    render_html(streamer.trace, path=out, title=toy.title, question=example.question, top_k=top)
    trace_dir = streamer.trace.save(png_dir / "trace")
    elapsed = time.perf_counter() - start
    print(f"\nWrote {out}, {len(pngs)} overlay PNGs and the trace in {png_dir}/ ({elapsed:.1f} s). "
          f"Top region on {toy.object_words} for {sum(hits)}/{len(hits)} steps"
          + ("." if streamer.trace.calibrated else " (uncalibrated scores: raw value-norm attention, no estimator)."))
    return {"html": out, "pngs": pngs, "trace_dir": trace_dir, "spans": len(streamer.trace.spans), "hits": hits, "seconds": elapsed,
            "text": streamer.trace.text, "example": example, "trace": streamer.trace}


def main(args: argparse.Namespace | Sequence[str] | None = None) -> int:
    """Entry point for ``hf-vattr demo`` (receives the CLI namespace with ``demo_args``) or a list of args."""
    if isinstance(args, argparse.Namespace):
        argv = list(getattr(args, "demo_args", []) or [])
    else:
        argv = list(sys.argv[1:] if args is None else args)  # `python -m hf_vattr.commands.demo --out x.html` too
    opts = _parser().parse_args(argv)
    run_demo(opts.seed, opts.index, opts.out, opts.top, opts.quiet, opts.no_estimator, opts.video)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
