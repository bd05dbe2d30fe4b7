"""Does the web app slow decoding? Tokens/s of the bundled toy with and without the app's streaming loop.

Three ways to run the same prompt, interleaved (rotating order, per example and repeat) so that drifts
of a shared machine hit all of them alike:

  generate   plain ``model.generate`` (no streamer)
  streamer   ``AttributionStreamer.generate`` with a bare loop reading every event
  app        :meth:`hf_vattr.app.LiveApp.stream`: the app's loop, rendering overlays, step pictures and the
             trajectory plot (throttled to ``--updates-per-second``), everything but the browser

Decode tokens/s = decoding steps per second between generate's first and last step, read from a stopping
criterion that only records time, so it measures the decoding thread (prefill and region building excluded). The app
loop also shows each finished step for at least 1 / updates-per-second s, after decoding has moved on;
its end-to-end time (until the loop ends) is reported separately.

    python benchmarks/bench_app.py --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from typing import Any

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_vattr import AttributionStreamer, LinearEstimator
from hf_vattr.app import LiveApp
from hf_vattr.demo import HELD_OUT_SEED, toy_estimator_path
from hf_vattr.toy import load_toy_model, make_examples, prompt_messages

MARKER = "<!-- bench_app -->"


class StepClock(StoppingCriteria):
    """Records when each decoding step ends; never stops generation."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        self.times.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def run_once(mode: str, apps: dict[str, LiveApp], model: Any, processor: Any, example: Any, estimator: Any,
             max_new_tokens: int) -> dict:
    """One generation in ``mode``; returns tokens, decode seconds, end-to-end seconds and frames."""
    clock = StepClock()
    criteria = StoppingCriteriaList([clock])
    app = apps.get(mode) or next(iter(apps.values()))
    request = app.check_inputs(example.image, example.question)
    frames = 0
    start = time.perf_counter()
    if mode == "generate":
        inputs = app._inputs(request)
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=criteria)
        tokens = int(out.shape[1] - inputs["input_ids"].shape[1])
    elif mode == "streamer":
        inputs = app._inputs(request)
        streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=estimator, images=[request.image],
                                       regions=app._regions(request, inputs))
        with streamer:
            for _ in streamer.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                       stopping_criteria=criteria):
                pass
        tokens = len(streamer.trace.tokens)
    else:
        last = None
        for frame in app.stream(request, max_new_tokens=max_new_tokens, do_sample=False, stopping_criteria=criteria):
            frames += 1
            last = frame
        tokens = last.tokens
    end = time.perf_counter()
    steps = clock.times  # one per generated token: the decode rate excludes prefill and region building
    return {"tokens": tokens, "rate": (len(steps) - 1) / (steps[-1] - steps[0]), "total": end - start,
            "frames": frames}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--examples", type=int, default=8, help="held-out toy examples")
    p.add_argument("--repeats", type=int, default=3, help="runs of each example per mode")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--rates", type=float, nargs="+", default=[4.0, 1.0], help="app updates per second to compare")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--write", default=None, help="markdown file whose bench_app section is replaced")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    model, processor = load_toy_model()
    estimator = LinearEstimator.from_pretrained(str(toy_estimator_path()))
    apps = {f"app@{r:g}": LiveApp(model, processor, estimator, regions="vlm", updates_per_second=r)
            for r in args.rates}
    examples = make_examples(args.examples, seed=HELD_OUT_SEED)
    modes = ["generate", "streamer", *apps]
    for mode in modes:  # warm-up (first calls compile / verify routes)
        run_once(mode, apps, model, processor, examples[0], estimator, args.max_new_tokens)
    rows: dict[str, list[dict]] = {m: [] for m in modes}
    ratios: dict[str, list[float]] = {m: [] for m in modes[1:]}
    turn = 0
    for example in examples:
        for _ in range(args.repeats):
            order = modes[turn % len(modes):] + modes[:turn % len(modes)]
            turn += 1
            got = {m: run_once(m, apps, model, processor, example, estimator, args.max_new_tokens) for m in order}
            for m in modes:
                rows[m].append(got[m])
            for m in modes[1:]:
                ratios[m].append(got[m]["rate"] / got["generate"]["rate"])

    def tps(m: str) -> float:
        return statistics.median(r["rate"] for r in rows[m])

    n = len(rows["generate"])
    machine = f"{platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s)"
    lines = [
        MARKER,
        "## The web app's streaming loop (`hf-vattr app`)",
        "",
        f"`python benchmarks/bench_app.py --examples {args.examples} --repeats {args.repeats} --threads "
        f"{args.threads} --rates {' '.join(f'{r:g}' for r in args.rates)}`. Bundled toy model (float32, CPU, sdpa), its estimator, `vlm` regions (K = 16); "
        f"{n} runs per mode, the modes interleaved (rotating order); greedy, "
        f"{statistics.median(r['tokens'] for r in rows['generate']):.0f} tokens per run (median); {machine}; "
        "the 2-core box was shared with other jobs. Decode tokens/s = steps per second between generate's "
        "first and last decoding step (a stopping criterion that only records time; prefill and region building "
        "excluded). Ratio = median over runs of "
        "(mode tokens/s / the same example's plain-generate tokens/s, same repeat).",
        "",
        "| mode | decode tokens/s (median) | ratio to plain generate (median) | end-to-end s per run (median) "
        "| page frames per run |",
        "|---|---:|---:|---:|---:|",
        f"| plain `model.generate` | {tps('generate'):.1f} | 1.00 | "
        f"{statistics.median(r['total'] for r in rows['generate']):.2f} | - |",
        f"| `AttributionStreamer`, bare loop | {tps('streamer'):.1f} | {statistics.median(ratios['streamer']):.2f} | "
        f"{statistics.median(r['total'] for r in rows['streamer']):.2f} | - |",
        *[f"| app loop (`LiveApp.stream`, {m[4:]} updates/s) | {tps(m):.1f} | {statistics.median(ratios[m]):.2f} | "
          f"{statistics.median(r['total'] for r in rows[m]):.2f} | {statistics.median(r['frames'] for r in rows[m]):.0f} |"
          for m in apps],
        "",
        "The app's end-to-end time includes its pacing (each finished step stays on screen at least "
        "1 / rate s, after decoding has moved on); the toy writes a whole trace in "
        "well under a second, so that pacing, not decoding, sets how long its page takes. A real thinking "
        "model writes a step every second or more, where the pacing never waits.",
        "",
        MARKER,
    ]
    table = "\n".join(lines) + "\n"
    print(table)
    if args.write:
        with open(args.write) as fh:
            text = fh.read()
        if text.count(MARKER) >= 2:
            head, _, tail = text.split(MARKER, 2)
            text = head + table.rstrip("\n") + tail
        else:
            text = text.rstrip() + "\n\n" + table
        with open(args.write, "w") as fh:
            fh.write(text)


if __name__ == "__main__":
    main()
