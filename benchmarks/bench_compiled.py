"""Streaming cost under ``torch.compile`` with the static cache, against the same compiled model without it.

    python benchmarks/bench_compiled.py --threads 1 --write docs/benchmarks.md

Model: random weights at Qwen3-VL-2B text dims (as benchmarks/bench_streamer.py), 2 decoder layers, sdpa,
bfloat16; one 544x512 image (272 visual tokens) and filler text up to the context length. The model's
forward is compiled (``model.forward = torch.compile(model.forward)``) and ``generate`` runs with
``cache_implementation="static"``. Each decode step is timed from one stopping-criterion call to the
next, inside real ``generate`` calls; plain and streaming runs alternate, after a warm-up of each (which
compiles). Ratio: median streaming step over median plain step of the same context.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import numpy as np
import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList

from hf_vattr import AttributionStreamer, LinearEstimator
from hf_vattr.testing import build_model, build_processor, example_inputs

from bench_streamer import QWEN3_VL_2B_TEXT  # the same model dims (this folder is on sys.path when run as a script)

MARKER = "<!-- bench_compiled -->"


class StepClock(StoppingCriteria):
    """Records when generate checks its stopping criteria: once per decode step."""

    def __init__(self) -> None:
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores, **kwargs):
        self.stamps.append(time.perf_counter())
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)

    def steps(self) -> list[float]:
        return [b - a for a, b in zip(self.stamps, self.stamps[1:])]


def prompt_of(processor, context: int) -> dict:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (544, 512, 3), dtype=np.uint8))
    short = example_inputs(processor, [image], text="Describe.")
    filler = " ".join(["the image shows"] * max(0, (context - short["input_ids"].shape[1]) // 3))
    return example_inputs(processor, [image], text=f"Describe. {filler}")


def run(model, inputs, new_tokens: int, streamer=None) -> tuple[list[float], str | None]:
    clock = StepClock()
    kwargs = dict(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  cache_implementation="static", stopping_criteria=StoppingCriteriaList([clock]))
    if streamer is None:
        model.generate(**kwargs)
        return clock.steps(), None
    for _ in streamer.generate(**kwargs):
        pass
    return clock.steps(), streamer.capture.path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--tokens", type=int, default=24, help="decode steps per generate call")
    parser.add_argument("--rounds", type=int, default=3, help="plain/streaming pairs per context, after warm-up")
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--write", default=None, help="markdown file whose compiled-mode section to replace")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    processor = build_processor("qwen3_vl", max_pixels=2_000_000)
    model = build_model("qwen3_vl", processor.tokenizer, attn_implementation="sdpa",
                        text_overrides=dict(QWEN3_VL_2B_TEXT, num_hidden_layers=args.layers)).to(torch.bfloat16)
    eager_forward = model.forward
    compiled_forward = torch.compile(eager_forward)
    estimator = LinearEstimator(args.layers, 16, model_type="qwen3_vl")
    rows = []
    for context in args.contexts:
        inputs = prompt_of(processor, context)
        inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
        length = int(inputs["input_ids"].shape[1])
        model.forward = compiled_forward
        run(model, inputs, 4)  # warm-up: compiles for this context
        run(model, inputs, 4, AttributionStreamer(model, processor, estimator=estimator))
        plain, streaming, uncompiled, paths = [], [], [], set()
        for _ in range(args.rounds):
            model.forward = eager_forward
            uncompiled += run(model, inputs, args.tokens)[0]
            model.forward = compiled_forward
            plain += run(model, inputs, args.tokens)[0]
            steps, path = run(model, inputs, args.tokens, AttributionStreamer(model, processor, estimator=estimator))
            streaming += steps
            paths.add(path)
        p, s, u = statistics.median(plain), statistics.median(streaming), statistics.median(uncompiled)
        rows.append((length, u, p, s, s / p, ", ".join(sorted(paths))))
        print(rows[-1], flush=True)

    machine = f"{platform.machine()}, {args.threads} torch thread(s), torch {torch.__version__}, cpu"
    lines = [
        MARKER,
        "## Streaming under torch.compile (static cache)",
        "",
        f"`python benchmarks/bench_compiled.py --threads {args.threads} --tokens {args.tokens} --rounds {args.rounds}`. "
        f"Qwen3-VL-2B text dims, {args.layers} decoder layers, bfloat16, sdpa, `model.forward = "
        "torch.compile(model.forward)`, `cache_implementation=\"static\"`; each decode step timed inside real "
        f"`generate` calls, uncompiled plain, compiled plain and compiled streaming alternating ({args.rounds} x {args.tokens} steps each); {machine}.",
        "",
        "| prompt tokens | plain, not compiled ms/token | plain compiled ms/token | streaming compiled ms/token "
        "| streaming / plain compiled | decode route |",
        "|---:|---:|---:|---:|---:|---|",
    ]
    lines += [f"| {c} | {u * 1000:.1f} | {p * 1000:.1f} | {s * 1000:.1f} | **{r:.3f}** | {route} |"
              for c, u, p, s, r, route in rows]
    lines.append(MARKER)
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(args.write) as f:
            text = f.read()
        if MARKER in text:
            before, _, rest = text.partition(MARKER)
            _, _, after = rest.partition(MARKER)
            text = before + table + after
        else:
            text = text.rstrip("\n") + "\n\n" + table + "\n"
        with open(args.write, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
