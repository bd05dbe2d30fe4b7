"""Collection throughput: the batched, prefix-reusing ablation engine vs one mask = one full forward.

Both routes compute the same numbers (asserted): span log-probs of a generated trace under the
K leave-one-out masks and M random-subset masks a collected example needs. The naive route runs
the whole model (vision tower included) once per mask; the engine encodes the image once, batches
masks, and restarts each batch from a cached prefix.

    python benchmarks/bench_collection.py                 # prints the table
    python benchmarks/bench_collection.py --write-docs    # and updates docs/collection.md ("Benchmark")

The model is a randomly initialised Qwen3-VL (4 decoder layers, hidden 256, 8 heads) with a
tiny vision tower, a ~100-token system prompt before the image, ~150 visual tokens and a
64-token generated trace cut into 8 spans: small enough for CPU, shaped like the real thing.
"""

from __future__ import annotations

import argparse
import dataclasses
import platform
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_vattr.pipeline.ablation import (  # noqa: E402
    AblationEngine,
    leave_one_out_masks,
    random_subset_masks,
    span_logprobs_naive,
)
from hf_vattr.capture.attention import AttentionCapture  # noqa: E402
from hf_vattr.layouts import extend_inputs, visual_layout  # noqa: E402
from hf_vattr.regions import prompt_regions  # noqa: E402
from hf_vattr.testing import FAMILIES, build_model, build_processor, example_image  # noqa: E402

SYSTEM = ("You are a careful visual reasoning assistant. Look at every part of the image before answering. "
          "Describe the shapes, their colours and where they are, step by step, one observation per line. "
          "When you are sure, write the final answer after the thinking block. Keep each step short and "
          "refer to image locations such as top left, centre or bottom right whenever it helps.")


def build(args):
    # The tiny qwen3_vl recipe with a wider decoder; the vision tower's output width must follow it
    # (build_model's text_overrides do not touch the vision config), hence a benchmark-only recipe.
    base = FAMILIES["qwen3_vl"]
    FAMILIES["qwen3_vl_bench"] = dataclasses.replace(base, vision_config=dict(base.vision_config, out_hidden_size=256))
    processor = build_processor("qwen3_vl_bench", max_pixels=args.max_tokens * 32 * 32)
    model = build_model("qwen3_vl_bench", processor.tokenizer, seed=0, text_overrides=dict(
        num_hidden_layers=4, hidden_size=256, intermediate_size=512, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32))
    return model.to(args.device), processor


def make_example(processor, model, args, seed):
    image = example_image(416, 384, seed=seed)
    messages = [{"role": "system", "content": SYSTEM},
                {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Which shape is red?"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[text], images=[image], return_tensors="pt")
    inputs = {k: (v.to(args.device) if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()}
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [image])
    regions = prompt_regions(layout, k=args.k)
    with torch.no_grad():
        seq = model.generate(**inputs, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False)
    spans = [(s, min(s + args.span, args.new_tokens)) for s in range(0, args.new_tokens, args.span)]
    k = regions.num_regions
    gen = torch.Generator().manual_seed(seed)
    masks = torch.cat([torch.zeros(1, k, dtype=torch.bool), leave_one_out_masks(k),
                       random_subset_masks(k, args.subsets, generator=gen)])
    return inputs, seq, regions, spans, masks, layout


CLOCK = time.perf_counter


def timed(fn, repeats):
    best = float("inf")
    out = None
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = CLOCK()
        out = fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, CLOCK() - t0)
    return best, out


def features_forward(model, inputs, seq, regions, layout):
    """What the naive collector adds for features: one teacher-forced forward with capture."""
    prompt_len = inputs["input_ids"].shape[1]
    with AttentionCapture(model, layout.positions, regions.membership(), rows="all", first_row=prompt_len - 1) as cap:
        with torch.no_grad():
            model(**extend_inputs(inputs, seq[:, :-1]), use_cache=False)
        return cap.pop()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--examples", type=int, default=2)
    p.add_argument("--k", type=int, default=16)
    p.add_argument("--subsets", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--span", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=160, help="visual-token budget of the processor")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="best of N per route")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="cpu = this process's CPU time (robust on a shared machine; use with --threads 1)")
    p.add_argument("--write-docs", nargs="?", const=str(ROOT / "docs" / "collection.md"), default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.perf_counter if args.clock == "wall" else time.process_time
    torch.backends.cuda.matmul.allow_tf32 = False

    model, processor = build(args)
    routes = {
        "naive: 1 mask = 1 full forward (vision tower each time)": None,
        "engine, batch 1, no prefix cache": dict(batch_size=1, reuse_prefix="none"),
        f"engine, batch {args.batch_size}, no prefix cache": dict(batch_size=args.batch_size, reuse_prefix="none"),
        f"engine, batch {args.batch_size}, cache up to first visual token": dict(batch_size=args.batch_size,
                                                                                 reuse_prefix="prompt"),
        f"engine, batch {args.batch_size}, cache up to first ablated token (default)": dict(
            batch_size=args.batch_size, reuse_prefix="ablated"),
    }
    totals = {name: 0.0 for name in routes}
    gen_time = feat_time = 0.0
    max_diff = 0.0
    shape = {}
    for ex in range(args.examples):
        t0 = CLOCK()
        inputs, seq, regions, spans, masks, layout = make_example(processor, model, args, seed=ex)
        gen_time += CLOCK() - t0
        ft, _ = timed(lambda: features_forward(model, inputs, seq, regions, layout), args.repeats)
        feat_time += ft
        shape = dict(prompt=inputs["input_ids"].shape[1], prefix=layout.first_visual_position,
                     visual=layout.num_visual_tokens, generated=seq.shape[1] - inputs["input_ids"].shape[1],
                     masks=masks.shape[0], spans=len(spans), k=regions.num_regions)
        t, reference = timed(lambda: span_logprobs_naive(model, inputs, seq, spans, masks, regions), args.repeats)
        totals[next(iter(routes))] += t
        for name, kw in list(routes.items())[1:]:
            def run():
                engine = AblationEngine(model, inputs, seq, regions, max_generated=max(e for _, e in spans))
                return engine.span_logprobs(spans, masks, **kw)
            t, got = timed(run, args.repeats)
            totals[name] += t
            max_diff = max(max_diff, float((got - reference).abs().max()))
    assert max_diff < 2e-3, f"engine and naive route disagree by {max_diff}"

    n = args.examples
    naive = totals[next(iter(routes))] / n
    lines = [
        f"Model: Qwen3-VL architecture, random weights, 4 layers x 8 heads, hidden 256; per example: "
        f"{shape['prompt']}-token prompt ({shape['prefix']} text tokens before the image, {shape['visual']} visual "
        f"tokens), {shape['generated']} generated tokens in {shape['spans']} spans, K = {shape['k']} regions, "
        f"{shape['masks']} masks (1 unablated + {shape['k']} leave-one-out + {args.subsets} random subsets). "
        f"Device: {args.device} ({platform.processor() or platform.machine()}, {args.threads} threads, "
        f"{'wall-clock' if args.clock == 'wall' else 'process CPU'} time, best of {args.repeats}), "
        f"torch {torch.__version__}, mean of {n} examples. Engine and naive numbers agree to {max_diff:.1e}.",
        "",
        "| route | ablation s / example | collection s / example (+ generation, features) "
        "| speedup (ablation) | speedup (collection) |",
        "|---|---:|---:|---:|---:|",
    ]
    overhead = (gen_time + feat_time) / n
    for name, total in totals.items():
        t = total / n
        # the engine's unablated pass also yields the features, so only the naive route pays feat_time
        coll = t + gen_time / n + (feat_time / n if routes[name] is None else 0.0)
        naive_coll = naive + overhead
        lines.append(f"| {name} | {t:.2f} | {coll:.2f} | {naive / t:.1f}x | {naive_coll / coll:.1f}x |")
    table = "\n".join(lines)
    command = (f"python benchmarks/bench_collection.py --write-docs --examples {n} --threads {args.threads} "
               f"--clock {args.clock} --repeats {args.repeats}")
    if args.device != "cpu":
        command += f" --device {args.device}"
    print(table)
    if args.write_docs:
        path = Path(args.write_docs)
        doc = path.read_text() if path.exists() else "# Ground-truth collection\n"
        block = f"<!-- benchmark:start -->\nReproduce with `{command}`.\n\n{table}\n<!-- benchmark:end -->"
        if "<!-- benchmark:start -->" in doc:
            doc = re.sub(r"<!-- benchmark:start -->.*?<!-- benchmark:end -->", lambda m: block, doc, flags=re.S)
        else:
            doc = doc.rstrip() + "\n\n## Benchmark\n\n" + block + "\n"
        path.write_text(doc)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
