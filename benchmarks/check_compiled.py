"""Attribution under ``torch.compile`` with the static cache: route and features against the uncompiled run.

    python benchmarks/check_compiled.py

Streams 6 tokens of a tiny Qwen3-VL with ``cache_implementation="static"``, uncompiled, then with
``model.forward = torch.compile(model.forward)``; prints the route that served the decode steps
(``"lse"``: constant cost in the trace length) and the largest feature difference.
"""

import time

import torch

from hf_vattr import AttributionStreamer, TokenAttribution
from hf_vattr.testing import example_inputs, tiny_vlm


def features(model, processor, inputs):
    streamer = AttributionStreamer(model, processor, keep_features=True)
    events = streamer.generate(**inputs, max_new_tokens=6, do_sample=False, cache_implementation="static")
    return torch.stack([e.features for e in events if isinstance(e, TokenAttribution)]), streamer.capture.path


def main() -> None:
    model, processor = tiny_vlm("qwen3_vl")
    inputs = example_inputs(processor)
    reference, _ = features(model, processor, inputs)
    model.forward = torch.compile(model.forward)
    start = time.perf_counter()
    compiled, path = features(model, processor, inputs)
    print(f"compiled run (compilation included): {time.perf_counter() - start:.1f} s; decode route: {path}; "
          f"max feature difference to the uncompiled run: {(compiled - reference).abs().max().item():.1e}")


if __name__ == "__main__":
    main()
