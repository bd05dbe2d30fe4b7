"""`hf-vattr demo`: stream attribution from the bundled toy thinking VLM, offline, on CPU.

Prints the trace as it is generated and, after each finished reasoning step, its top
regions (and whether the top region lands on the object the step talks about: the toy
task knows the right answer). Then writes a self-contained HTML report (hf_vattr.viz: the same
rendering as the notebook view and the web app), one overlay PNG per step, and the trace itself
(``AttributionTrace.load("vattr_report/trace")`` brings it back in a notebook).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence


from ..toy import toy_estimator_path, toy_regions

__all__ = ["main", "run_demo"]

HELD_OUT_SEED = 20261125  # examples drawn from a seed the toy model never trained on


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
    return p


def run_demo(seed: int = HELD_OUT_SEED, index: int = 0, out: str | Path = "vattr_report.html", top: int = 3,
             quiet: bool = False, no_estimator: bool = False) -> dict:
    """Run the demo and return a summary dict (paths, spans, pointing hits, the trace itself)."""
    import torch

    from ..estimator import LinearEstimator
    from ..streaming.streamer import AttributionStreamer, SpanAttribution, TokenAttribution
    from ..toy import evidence_for_step, load_toy_model, make_examples, prompt_messages, region_on_evidence
    from ..viz import (UNCALIBRATED_NOTE, describe_regions, evidence_wording, render_html, save_overlays,
                       span_evidence)

    start = time.perf_counter()
    torch.set_num_threads(max(1, min(4, torch.get_num_threads())))
    model, processor = load_toy_model()
    est_path = toy_estimator_path()
    if not (est_path / "config.json").exists():
        raise FileNotFoundError(
            f"The toy estimator is missing at {est_path}. Reinstall hf_vattr, or rebuild it from a source "
            "checkout with `python scripts/toy/faithfulness.py`."
        )
    estimator = LinearEstimator.from_pretrained(str(est_path))
    example = make_examples(1, seed=seed, start=index)[-1]
    images = [example.image]
    prompt = processor.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=images, return_tensors="pt")
    regions = toy_regions(model, inputs, images, estimator)
    streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=None if no_estimator else estimator,
                                   images=images, regions=regions, print_text=False, timeout=120)
    print(f"Question: {example.question}\n")
    if no_estimator:
        print(f"Scores are {UNCALIBRATED_NOTE}.\n")
    hits = []
    at_line_start = True
    # Print from the event stream itself (not the streamer's own printer, which runs in another
    # thread): text and step annotations then come out in generation order.
    for event in streamer.generate(**inputs, max_new_tokens=96, do_sample=False):
        if isinstance(event, TokenAttribution):
            if not quiet and event.text:
                print(event.text, end="", flush=True)
                at_line_start = event.text.endswith("\n")
            continue
        if isinstance(event, SpanAttribution):
            top_ids = event.top_regions(top)
            evidence = evidence_for_step(example, event.text) if event.section == "thinking" else None
            verdict = ""
            if evidence is not None:
                hit = region_on_evidence(streamer.regions, top_ids[0], evidence)
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
    render_html(streamer.trace, path=out, title="hf_vattr demo: toy thinking VLM", question=example.question,
                top_k=top)
    trace_dir = streamer.trace.save(png_dir / "trace")
    elapsed = time.perf_counter() - start
    print(f"\nWrote {out}, {len(pngs)} overlay PNGs and the trace in {png_dir}/ ({elapsed:.1f} s). "
          f"Top region on the step's object for {sum(hits)}/{len(hits)} steps"
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
    run_demo(opts.seed, opts.index, opts.out, opts.top, opts.quiet, opts.no_estimator)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(None))
