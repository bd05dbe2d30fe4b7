"""Stream a thinking VLM's reasoning with per-step image-region attributions.

Runs offline on the bundled toy model by default; point it at a real model and its
estimator for the real thing:

    python examples/stream_attributions.py                                   # toy model, CPU, seconds
    python examples/stream_attributions.py --model Qwen/Qwen3-VL-2B-Thinking \\
        --estimator <your-org>/qwen3-vl-2b-thinking-vattr --image photo.jpg \\
        --question "How many people wear hats?" --html report.html

Without ``--estimator`` on a real model, scores fall back to raw attention (not causal;
train an estimator with examples/train_estimator.sh).
"""

from __future__ import annotations

import argparse

import torch
from PIL import Image
from transformers import AutoModelForImageTextToText, AutoProcessor

from hf_vattr import AttributionStreamer, LinearEstimator, SpanAttribution, TokenAttribution
from hf_vattr.viz import describe_regions, render_html


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="Hub id or folder (default: the bundled toy model)")
    p.add_argument("--estimator", default=None, help="Hub id or folder (default with the toy: its estimator)")
    p.add_argument("--image", default=None, help="image file (default with the toy: a held-out toy image)")
    p.add_argument("--question", default=None)
    p.add_argument("--regions", default="prefill",
                   help="prefill (the VLM's own features, free) | vlm | grid | dinov3 | auto | slic (docs/regions.md)")
    p.add_argument("--max-new-tokens", type=int, default=1024)
    p.add_argument("--html", default=None, help="also write a self-contained HTML report here")
    args = p.parse_args(argv)

    if args.model is None:  # the bundled toy: a tiny Qwen3-VL trained by this repo
        from hf_vattr.toy import toy_estimator_path
        from hf_vattr.toy import make_examples, toy_checkpoint_path

        args.model = str(toy_checkpoint_path())
        args.estimator = args.estimator or str(toy_estimator_path())
        example = make_examples(1, seed=1_000_001, start=3)[-1]
        image, question = example.image, args.question or example.question
    else:
        if args.image is None or args.question is None:
            p.error("--image and --question are required with --model")
        image, question = Image.open(args.image).convert("RGB"), args.question

    model = AutoModelForImageTextToText.from_pretrained(
        args.model, dtype="auto", device_map="auto" if torch.cuda.is_available() else None).eval()
    processor = AutoProcessor.from_pretrained(args.model)
    estimator = LinearEstimator.from_pretrained(args.estimator) if args.estimator else None

    messages = [{"role": "user", "content": [{"type": "image", "image": image},
                                             {"type": "text", "text": question}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                           return_dict=True, return_tensors="pt").to(model.device)
    streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=estimator, images=[image],
                                   regions=args.regions)

    print(f"Q: {question}\n")
    text = ""
    # streamer.generate runs model.generate in a thread the streamer owns: any failure ends this loop
    # with GenerationError (its __cause__ is the original exception), and nothing stays patched.
    for event in streamer.generate(**inputs, max_new_tokens=args.max_new_tokens):  # every token, each finished step
        if isinstance(event, TokenAttribution):
            print(event.text, end="", flush=True)
            text += event.text
        elif isinstance(event, SpanAttribution):
            where = describe_regions(streamer.regions, event.top_regions(3))
            newline = "" if text.endswith("\n") else "\n"
            print(f"{newline}    [{event.section} step {event.index}] relies on {where}", flush=True)
            text += newline
    if args.html:
        render_html(streamer.trace, [image], args.html, question=question)
        print(f"\nwrote {args.html}")


if __name__ == "__main__":
    main()
