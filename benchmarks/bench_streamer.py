"""Per-token decode time with and without the AttributionStreamer, same run, same model.

Model: random weights at Qwen3-VL-2B-like text dims (28 layers, 16 heads, 8 KV heads,
hidden 2048, intermediate 6144), a small vision tower, one image of >= 256 visual
tokens, greedy decoding of >= 256 new tokens, sdpa attention.

Routes timed (interleaved, repeated; median reported):
  baseline   generate() with no streamer
  streamer   generate(streamer=AttributionStreamer(...)) with a LinearEstimator and a consumer thread
  naive      eager attention + output_attentions=True + return_dict_in_generate (what you would do without us)

Per-token decode time = (time(N new tokens) - time(1 new token)) / (N - 1), so prefill is excluded.

    python benchmarks/bench_streamer.py --new-tokens 256 --repeats 3 --write docs/benchmarks.md
"""

from __future__ import annotations

import argparse
import platform
import statistics
import threading
import time

import torch

from hf_vattr import AttributionStreamer, LinearEstimator
from hf_vattr.testing import build_model, build_processor, example_inputs
from PIL import Image
import numpy as np

QWEN3_VL_2B_TEXT = dict(
    num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, hidden_size=2048,
    intermediate_size=6144, head_dim=128,
    rope_parameters={"rope_type": "default", "mrope_section": [24, 20, 20], "mrope_interleaved": True,
                     "rope_theta": 5000000.0},
)


def _generate(model, inputs, n, **kwargs):
    return model.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False, **kwargs)


def time_route(route, model, proc, inputs, n, estimator):
    def run(num):
        if route == "baseline":
            start = time.perf_counter()
            _generate(model, inputs, num)
            return time.perf_counter() - start
        if route == "naive":
            start = time.perf_counter()
            _generate(model, inputs, num, output_attentions=True, return_dict_in_generate=True)
            return time.perf_counter() - start
        streamer = AttributionStreamer(model, proc, inputs=inputs, estimator=estimator, print_text=False,
                                       timeout=600)
        consumed = []
        consumer = threading.Thread(target=lambda: consumed.extend(streamer))
        consumer.start()
        start = time.perf_counter()
        _generate(model, inputs, num, streamer=streamer)
        elapsed = time.perf_counter() - start
        consumer.join()
        assert sum(1 for e in consumed if hasattr(e, "token_id")) == num
        return elapsed

    t1 = run(1)
    tn = run(n)
    return (tn - t1) / (n - 1), t1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--new-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--image-size", type=int, nargs=2, default=(544, 512), help="height width in px")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-naive", action="store_true")
    parser.add_argument("--write", default=None, help="markdown file to append the results table to")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    proc = build_processor("qwen3_vl", max_pixels=2_000_000)
    sdpa = build_model("qwen3_vl", proc.tokenizer, text_overrides=QWEN3_VL_2B_TEXT)
    h, w = args.image_size
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (h, w, 3), dtype=np.uint8))
    inputs = example_inputs(proc, [image], text="Describe the image step by step.")
    visual = int((inputs["input_ids"] == sdpa.config.image_token_id).sum())
    L, H = 28, 16
    estimator = LinearEstimator(L, H, model_type="qwen3_vl")
    routes = {"baseline": sdpa, "streamer": sdpa}
    if not args.skip_naive:
        eager = build_model("qwen3_vl", proc.tokenizer, text_overrides=QWEN3_VL_2B_TEXT,
                            attn_implementation="eager")
        routes["naive"] = eager
    results: dict[str, list[float]] = {r: [] for r in routes}
    prefill: dict[str, list[float]] = {r: [] for r in routes}
    with torch.no_grad():
        _generate(sdpa, inputs, 2)  # warm-up
        for rep in range(args.repeats):
            for route, model in routes.items():
                per_token, t1 = time_route(route, model, proc, inputs, args.new_tokens, estimator)
                results[route].append(per_token)
                prefill[route].append(t1)
                print(f"repeat {rep} {route:9s} {per_token * 1000:8.2f} ms/token (prefill+1: {t1:.2f} s)", flush=True)

    base = statistics.median(results["baseline"])
    lines = [
        f"Model: random Qwen3-VL text dims (28 layers, 16 heads, 8 KV heads, hidden 2048, intermediate 6144), "
        f"float32, sdpa; {visual} visual tokens; prompt {inputs['input_ids'].shape[1]} tokens; "
        f"{args.new_tokens} new tokens; median of {args.repeats} interleaved repeats; "
        f"{platform.processor() or platform.machine()}, {args.threads} threads, torch {torch.__version__}.",
        "",
        "| route | ms / token (median) | all repeats (ms) | ratio vs baseline |",
        "|---|---:|---|---:|",
    ]
    for route, values in results.items():
        med = statistics.median(values)
        lines.append(f"| {route} | {med * 1000:.1f} | {', '.join(f'{v * 1000:.1f}' for v in values)} | "
                     f"{med / base:.3f} |")
    table = "\n".join(lines)
    print(table)
    if args.write:
        with open(args.write, "a") as fh:
            fh.write("\n## Streaming overhead (decode loop)\n\n")
            fh.write("`python benchmarks/bench_streamer.py " + " ".join(
                f"--new-tokens {args.new_tokens} --repeats {args.repeats}".split()) + "`\n\n")
            fh.write(table + "\n")


if __name__ == "__main__":
    main()
