"""AttributionTrace.save / load: everything comes back, field by field, from safetensors + JSON (no pickle)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from hf_vattr.streaming.events import AttributionTrace, SpanAttribution, TokenAttribution
from hf_vattr.layouts import ImageTokens, VisualLayout
from hf_vattr.regions import PromptRegions, RegionMap, grid_regions


def build_trace(with_features: bool = True) -> AttributionTrace:
    """Two images: a hard grid map and a soft (fractional membership) map; tokens in both sections."""
    first = ImageTokens(0, torch.arange(2, 14), (1, 3, 4), 32, (90, 130))
    second = ImageTokens(1, torch.arange(16, 20), (1, 2, 2), 28, None)
    hard = grid_regions(first, 4)
    g = torch.Generator().manual_seed(0)
    soft_m = torch.rand(4, 3, generator=g)
    soft = RegionMap(second, soft_m / soft_m.sum(1, keepdim=True), method="masks", info={"note": "soft", "k": 3})
    layout = VisualLayout([first, second], sequence_length=24, model_type="qwen3_vl", extras={"mrope": [1, 2]})
    regions = PromptRegions(layout, [hard, soft])
    k = regions.num_regions
    pieces = ["The", " red", " cross", ".\n", "</think>", "yes", ""]
    tokens = []
    for i, piece in enumerate(pieces):
        features = torch.randn(2, 3, k, generator=g) if with_features and i % 2 == 0 else None
        tokens.append(TokenAttribution(i, 100 + i, piece, torch.randn(k, generator=g),
                                       "thinking" if i < 5 else "answer", features=features, sequence=1))
    spans = [SpanAttribution(0, "The red cross.\n", (0, 4), torch.randn(k, generator=g), "thinking", sequence=1),
             SpanAttribution(1, "yes", (5, 6), torch.randn(k, generator=g), "answer", sequence=1)]
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (90, 130, 3), dtype=np.uint8))
    floats = np.random.default_rng(1).random((56, 56, 3)).astype(np.float32)
    return AttributionTrace(regions, tokens, spans, prompt_text="<|im_start|>user\n\u00e9\u4e2d", sequence=1,
                            images=[rgb, floats])


def assert_regions_equal(a: PromptRegions, b: PromptRegions) -> None:
    assert (a.layout.sequence_length, a.layout.model_type, a.layout.extras) == \
           (b.layout.sequence_length, b.layout.model_type, b.layout.extras)
    assert len(a.maps) == len(b.maps) == len(a.layout.images) == len(b.layout.images)
    for ia, ib in zip(a.layout.images, b.layout.images):
        assert (ia.image_index, ia.grid_thw, ia.token_size, ia.original_size) == \
               (ib.image_index, ib.grid_thw, ib.token_size, ib.original_size)
        assert torch.equal(ia.positions, ib.positions)
    for ma, mb, ib in zip(a.maps, b.maps, b.layout.images):
        assert (ma.method, ma.info, ma.num_regions) == (mb.method, mb.info, mb.num_regions)
        assert torch.equal(ma.membership, mb.membership)
        assert mb.image is ib


def assert_traces_equal(a: AttributionTrace, b: AttributionTrace) -> None:
    assert (a.prompt_text, a.sequence, a.text) == (b.prompt_text, b.sequence, b.text)
    assert_regions_equal(a.regions, b.regions)
    assert len(a.tokens) == len(b.tokens)
    for ta, tb in zip(a.tokens, b.tokens):
        assert (ta.index, ta.token_id, ta.text, ta.section, ta.sequence) == \
               (tb.index, tb.token_id, tb.text, tb.section, tb.sequence)
        assert type(tb.token_id) is int
        assert torch.equal(ta.region_scores, tb.region_scores) and ta.region_scores.dtype == tb.region_scores.dtype
        assert (ta.features is None) == (tb.features is None)
        if ta.features is not None:
            assert torch.equal(ta.features, tb.features)
    assert len(a.spans) == len(b.spans)
    for sa, sb in zip(a.spans, b.spans):
        assert (sa.index, sa.text, sa.token_range, sa.section, sa.sequence) == \
               (sb.index, sb.text, sb.token_range, sb.section, sb.sequence)
        assert torch.equal(sa.region_scores, sb.region_scores)
    assert (a.images is None) == (b.images is None)
    for ia, ib in zip(a.images or [], b.images or []):
        assert type(ia) is type(ib)
        if isinstance(ia, Image.Image):
            assert ia.mode == ib.mode and ia.size == ib.size
        if isinstance(ia, tuple) or ia is None:
            assert ia == ib
        else:
            assert np.array_equal(np.asarray(ia), np.asarray(ib)) and np.asarray(ia).dtype == np.asarray(ib).dtype


def test_save_load_round_trips_every_field(tmp_path):
    trace = build_trace()
    folder = trace.save(tmp_path / "t")
    assert sorted(p.name for p in folder.iterdir()) == ["trace.json", "trace.safetensors"]
    loaded = AttributionTrace.load(folder)
    assert_traces_equal(trace, loaded)
    assert torch.equal(loaded.token_scores(), trace.token_scores())
    assert torch.equal(loaded.span_scores(), trace.span_scores())


def test_files_are_plain_json_and_safetensors(tmp_path):
    folder = build_trace().save(tmp_path / "t")
    meta = json.loads((folder / "trace.json").read_text(encoding="utf-8"))
    assert meta["format"] == "hf_vattr.trace" and meta["version"] == 1
    assert [t["text"] for t in meta["tokens"]][:3] == ["The", " red", " cross"]
    assert meta["images"][0] == {"kind": "pil", "mode": "RGB", "tensor": "image.0", "converted": False}
    with safe_open(str(folder / "trace.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.metadata()["format"] == "hf_vattr.trace"
    assert keys == {"token_scores", "span_scores", "token_features", "image.0", "image.1"}


def test_round_trip_of_other_image_kinds_and_an_empty_trace(tmp_path):
    trace = build_trace(with_features=False)
    palette = Image.new("P", (4, 3))
    trace.images = [(90, 130), palette]
    loaded = AttributionTrace.load(trace.save(tmp_path / "a"))
    assert loaded.images[0] == (90, 130)
    assert loaded.images[1].mode == "RGB" and loaded.images[1].size == (4, 3)  # palette stored as RGB pixels
    assert all(t.features is None for t in loaded.tokens)
    trace.images = [torch.arange(12, dtype=torch.uint8).reshape(3, 4), None]
    loaded = AttributionTrace.load(trace.save(tmp_path / "b"))
    assert torch.equal(loaded.images[0], trace.images[0]) and loaded.images[1] is None

    empty = AttributionTrace(None, prompt_text="p")
    back = AttributionTrace.load(empty.save(tmp_path / "c"))
    assert back.regions is None and back.tokens == [] and back.spans == [] and back.images is None
    assert back.prompt_text == "p"


def test_load_refuses_other_folders(tmp_path):
    folder = build_trace().save(tmp_path / "t")
    meta = json.loads((folder / "trace.json").read_text())
    meta["version"] = 99
    (folder / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="newer hf_vattr"):
        AttributionTrace.load(folder)
    meta["format"] = "something else"
    (folder / "trace.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="does not hold an hf_vattr trace"):
        AttributionTrace.load(folder)
