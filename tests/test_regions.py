"""Region unitization: guarantees, geometry per family, methods, serialization.

Real photos from scikit-image (astronaut, coffee, chelsea) are used
throughout; the tiny models of ``hf_vattr.testing`` give each family's real
processor (resize rule, patching) and vision tower without downloads.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage

skimage_data = pytest.importorskip("skimage.data")

from hf_vattr.layouts import ImageTokens, visual_layout  # noqa: E402
from hf_vattr.regions import (  # noqa: E402
    DEFAULT_K_POLICY,
    ColorFeatures,
    KPolicy,
    PromptRegions,
    RegionMap,
    TimmPatchFeatures,
    VisionFeatureRecorder,
    WardTree,
    WeightsUnavailableError,
    build_regions,
    build_ward_tree,
    choose_method,
    find_local_weights,
    grid_regions,
    mask_regions,
    prompt_regions,
    resize_to_token_grid,
    resolve_k,
    slic_regions,
    vlm_token_features,
)
from hf_vattr.testing import build_processor, example_inputs, tiny_vlm  # noqa: E402

FAMILIES = ["qwen2_5_vl", "qwen3_vl", "glm4v"]
TOKEN_PX = {"qwen2_5_vl": 28, "qwen3_vl": 32, "qwen3_vl_moe": 32, "glm4v": 28, "glm4v_moe": 28}


# --------------------------------------------------------------------------- helpers


def photo(name: str) -> np.ndarray:
    img = getattr(skimage_data, name)()
    if img.ndim == 2:
        img = np.stack([img] * 3, -1)
    return np.ascontiguousarray(img[..., :3])


def fake_tokens(h: int, w: int, u: int = 32, original: tuple[int, int] | None = None, index: int = 0) -> ImageTokens:
    return ImageTokens(index, torch.arange(h * w) + 10, (1, h, w), u, original)


def tokens_for(family: str, image: np.ndarray, *, min_pixels: int | None = None,
               max_pixels: int | None = None):
    """(ImageTokens, processor outputs, processor) for one image under the family's real processor."""
    proc = build_processor(family, min_pixels=min_pixels, max_pixels=max_pixels)
    pil = Image.fromarray(image)
    out = proc.image_processor(images=[pil], return_tensors="pt")
    t, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    merge = proc.image_processor.merge_size
    u = proc.image_processor.patch_size * merge
    tok = ImageTokens(0, torch.arange(t * gh * gw // merge**2), (t, gh // merge, gw // merge), u, image.shape[:2])
    return tok, out, proc


def assert_partition_guarantees(rmap: RegionMap, k: int) -> None:
    """Exactly k regions, each a single 4-connected piece of the token grid, every token covered once."""
    assert rmap.num_regions == k
    m = rmap.membership
    assert torch.allclose(m.sum(1), torch.ones(m.shape[0]))
    grid = rmap.token_grid().numpy()
    assert set(np.unique(grid).tolist()) == set(range(k)), "every region owns at least one token"
    for r in range(k):
        _, pieces = ndimage.label(grid == r)  # default structure: 4-connectivity
        assert pieces == 1, f"region {r} is split into {pieces} pieces"


def pixel_rows_in(lo: float, hi: float, n: int) -> np.ndarray:
    """Integer pixels whose centre lies in [lo, hi)."""
    centres = np.arange(n) + 0.5
    return (centres >= lo) & (centres < hi)


# --------------------------------------------------------------------------- K policy


def test_k_policy_default_range_and_caps():
    assert DEFAULT_K_POLICY(64) == 16
    assert 16 <= DEFAULT_K_POLICY(972) <= 128
    assert DEFAULT_K_POLICY(10_000) == 128
    assert DEFAULT_K_POLICY(9) == 9  # never more regions than tokens
    assert KPolicy(min_k=4, max_k=8, tokens_per_region=2)(100) == 8
    k, info = resolve_k(500, 100)
    assert k == 100 and info["requested_k"] == 500 and info["k_capped_by_tokens"]
    k, info = resolve_k(None, 972, KPolicy(tokens_per_region=10))
    assert k == 97 and info["k_source"] == "policy"
    with pytest.raises(ValueError):
        KPolicy(min_k=10, max_k=5)


# --------------------------------------------------------------------------- grid


@pytest.mark.parametrize("hw", [(23, 32), (27, 36), (1, 40), (40, 1), (3, 5)])
def test_grid_regions_hit_exactly_k_and_are_contiguous(hw):
    tok = fake_tokens(*hw)
    for k in (1, 7, 16, 17, 32, 64, 127, 128):
        assert_partition_guarantees(grid_regions(tok, k), min(k, hw[0] * hw[1]))


# --------------------------------------------------------------------------- Ward tree


@pytest.mark.slow
def test_ward_tree_built_once_serves_every_k_with_guarantees():
    img = photo("astronaut")  # 512 x 512
    tok = fake_tokens(23, 32, 32, img.shape[:2])
    feats = ColorFeatures()(img, tok)
    tree = build_ward_tree(feats, tok.grid_thw, normalize=False)
    labels = tree.labels_many([16, 32, 64, 128])
    for k, lab in labels.items():
        rmap = RegionMap.from_assignment(tok, lab)
        assert_partition_guarantees(rmap, k)
    # nested: every fine region lies inside one coarse region
    for fine, coarse in [(32, 16), (64, 32), (128, 64)]:
        pairs = set(zip(labels[fine].tolist(), labels[coarse].tolist()))
        assert len({f for f, _ in pairs}) == len(pairs)
    # K = N (every token its own region) and K = 1 are valid cuts
    assert len(np.unique(tree.labels(tok.num_tokens))) == tok.num_tokens
    assert len(np.unique(tree.labels(1))) == 1
    with pytest.raises(ValueError):
        tree.labels(tok.num_tokens + 1)
    # the tree serializes and re-cuts identically
    again = WardTree.from_dict(tree.to_dict())
    np.testing.assert_array_equal(again.labels(32), labels[32])


def test_build_regions_builds_one_tree_per_image_for_several_k(monkeypatch):
    import sklearn.cluster

    calls = []
    real = sklearn.cluster.ward_tree
    monkeypatch.setattr(sklearn.cluster, "ward_tree", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    img = photo("coffee")  # 400 x 600
    tok = fake_tokens(14, 21, 28, img.shape[:2])
    maps = build_regions(tok, "color", k=[16, 32, 64, 128], images=img)
    assert len(calls) == 1
    assert sorted(maps) == [16, 32, 64, 128]
    for k, rmap in maps.items():
        assert_partition_guarantees(rmap, k)
        assert rmap.method == "color" and rmap.info["k"] == k


def test_ward_regions_follow_image_content():
    """On a real photo, colour+Ward regions are more homogeneous than a grid of the same K."""
    img = photo("chelsea")
    tok = fake_tokens(10, 16, 28, img.shape[:2])
    feats = ColorFeatures(with_std=False)(img, tok)

    def within_variance(rmap: RegionMap) -> float:
        lab = rmap.assignment
        return float(sum(((feats[lab == r] - feats[lab == r].mean(0)) ** 2).sum() for r in range(rmap.num_regions)))

    ward = build_regions(tok, "features", k=16, features=feats, normalize=False)
    assert within_variance(ward) < 0.8 * within_variance(grid_regions(tok, 16))


# --------------------------------------------------------------------------- geometry per family


def reconstruct_resized(out, proc) -> torch.Tensor:
    ip = proc.image_processor
    p, m, tp = ip.patch_size, ip.merge_size, ip.temporal_patch_size
    t, gh, gw = (int(v) for v in out["image_grid_thw"][0])
    x = out["pixel_values"].reshape(gh // m, gw // m, m, m, 3, tp, p, p)[..., 0, :, :]
    x = x.permute(4, 0, 2, 5, 1, 3, 6).reshape(3, gh * p, gw * p)
    mean = torch.tensor(ip.image_mean).view(3, 1, 1)
    std = torch.tensor(ip.image_std).view(3, 1, 1)
    return (x * std + mean).clamp(0, 1)


GEOMETRY_CASES = [
    # (photo, crop (y0, y1, x0, x1) or None, limits in tokens (min, max) or None)
    ("chelsea", None, None),  # 300 x 451
    ("coffee", (0, 61, 0, 397), None),  # wide odd strip
    ("astronaut", (0, 451, 200, 313), None),  # tall odd strip
    ("coffee", (0, 37, 0, 45), (16, 64)),  # tiny: up-scaled to the min-pixels limit
    ("astronaut", None, (4, 30)),  # big: down-scaled under the max-pixels limit
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("case", GEOMETRY_CASES, ids=lambda c: f"{c[0]}-{c[1]}-{c[2]}")
def test_geometry_matches_each_processor(family, case):
    name, crop, limits = case
    img = photo(name)
    if crop is not None:
        img = np.ascontiguousarray(img[crop[0]:crop[1], crop[2]:crop[3]])
    u = TOKEN_PX[family]
    kw = {} if limits is None else dict(min_pixels=limits[0] * u * u, max_pixels=limits[1] * u * u)
    tok, out, proc = tokens_for(family, img, **kw)
    assert tok.token_size == u
    # the grid is the one the family's own resize rule gives (GLM's differs from Qwen's)
    ip = proc.image_processor
    if family.startswith("glm"):
        from transformers.models.glm4v.image_processing_glm4v import smart_resize
        rh, rw = smart_resize(num_frames=ip.temporal_patch_size, height=img.shape[0], width=img.shape[1],
                              temporal_factor=ip.temporal_patch_size, factor=u, min_pixels=ip.size["shortest_edge"],
                              max_pixels=ip.size["longest_edge"])
    else:
        from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize
        rh, rw = smart_resize(img.shape[0], img.shape[1], factor=u, min_pixels=ip.size["shortest_edge"],
                              max_pixels=ip.size["longest_edge"])
    assert tok.resized_size == (rh, rw)
    # the vision tower saw exactly a whole-image resize of the original onto the token grid (no crop, no pad),
    # which is what both the overlays (scale_yx) and our DINO/colour resize assume
    seen = reconstruct_resized(out, proc)
    ours = resize_to_token_grid(img, tok, u)[0]
    assert seen.shape == ours.shape
    assert (seen - ours).abs().mean() < 0.03
    assert np.corrcoef(seen.flatten(), ours.flatten())[0, 1] > 0.97


def test_glm_resize_rule_differs_from_qwen():
    img = photo("coffee")
    limits = dict(min_pixels=16 * 28 * 28, max_pixels=64 * 28 * 28)
    qwen, _, _ = tokens_for("qwen2_5_vl", img, **limits)
    glm, _, _ = tokens_for("glm4v", img, **limits)
    assert qwen.num_tokens <= 64 and glm.num_tokens <= 32  # GLM counts two temporal frames against max_pixels
    assert qwen.grid_thw != glm.grid_thw


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v"])
def test_overlay_pixels_are_exactly_the_token_boxes(family):
    img = photo("coffee")[:, 37:559]  # 400 x 522: non-integer scales on both axes
    tok, _, _ = tokens_for(family, img, min_pixels=16 * TOKEN_PX[family] ** 2, max_pixels=80 * TOKEN_PX[family] ** 2)
    rmap = build_regions(tok, "color", k=12, images=img)
    masks = rmap.pixel_masks()
    H, W = img.shape[:2]
    assert masks.shape == (12, H, W)
    assert (masks.sum(0) == 1).all(), "regions tile the original image"
    drawn = np.zeros((12, H, W), dtype=bool)
    for t in range(tok.num_tokens):
        y0, x0, y1, x1 = tok.token_box_original(t)
        rows, cols = pixel_rows_in(y0, y1, H), pixel_rows_in(x0, x1, W)
        assert rows.any() and cols.any()
        drawn[int(rmap.assignment[t])][np.ix_(rows, cols)] = True
    np.testing.assert_array_equal(masks, drawn)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_painted_square_lands_in_its_tokens(family):
    """Paint the original-image boxes of a 2x2 token block red: colour features and masks find them there."""
    img = photo("astronaut")[40:470, 13:500].copy()  # 430 x 487
    tok, _, _ = tokens_for(family, img, min_pixels=16 * TOKEN_PX[family] ** 2, max_pixels=90 * TOKEN_PX[family] ** 2)
    h, w = tok.grid_hw
    r0, c0 = h // 2, w // 3
    block = [r * w + c for r in (r0, r0 + 1) for c in (c0, c0 + 1)]
    y0, x0, _, _ = tok.token_box_original(block[0])
    _, _, y1, x1 = tok.token_box_original(block[-1])
    H, W = img.shape[:2]
    square = np.outer(pixel_rows_in(y0, y1, H), pixel_rows_in(x0, x1, W))
    img[square] = (255, 0, 0)
    feats = ColorFeatures(with_std=False)(img, tok)  # L, a, b
    redness = feats[:, 1]
    inside = torch.zeros(tok.num_tokens, dtype=torch.bool)
    inside[block] = True
    assert redness[inside].min() > 60  # pure red: a* ~ 80
    assert redness[~inside].max() < redness[inside].min() - 15
    # the same square as a user mask: one region owns exactly those tokens, and its overlay is the square
    rmap = mask_regions(tok, [square])
    assert rmap.num_regions == 2 and rmap.info["rest_region"] == 1
    assert set(torch.nonzero(rmap.assignment == 0).flatten().tolist()) == set(block)
    np.testing.assert_array_equal(rmap.pixel_masks()[0], square)


# --------------------------------------------------------------------------- the VLM's own features


@pytest.mark.parametrize("family", ["qwen2_5_vl", "qwen3_vl", "glm4v", "qwen3_vl_moe", "glm4v_moe"])
def test_vlm_features_are_the_embeddings_at_the_image_tokens(family):
    """vlm_token_features(...)[i][j] is exactly what the LLM receives at image i's j-th visual token."""
    model, proc = tiny_vlm(family)
    imgs = [Image.fromarray(photo("chelsea")), Image.fromarray(photo("coffee")[:, :350])]
    inputs = example_inputs(proc, imgs)
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], imgs)
    feats = vlm_token_features(model, inputs["pixel_values"], inputs["image_grid_thw"])
    assert [f.shape[0] for f in feats] == [im.num_tokens for im in layout.images]
    seen = {}
    lm = model.model.language_model
    handle = lm.register_forward_pre_hook(lambda mod, args, kw: seen.update(embeds=kw["inputs_embeds"]),
                                          with_kwargs=True)
    try:
        with torch.no_grad(), VisionFeatureRecorder(model) as recorder:
            model(**inputs)
    finally:
        handle.remove()
    embeds = seen["embeds"][0]
    for im, f, rec in zip(layout.images, feats, recorder.features()):
        torch.testing.assert_close(embeds[im.positions].float(), f, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(rec, f)  # recorded during the model's own forward: same features, no extra pass
    prompt = build_regions(layout, "vlm", k=[4, 8], model=model, inputs=inputs)
    for k, regions in prompt.items():
        assert isinstance(regions, PromptRegions) and regions.num_regions == 2 * k
        for rmap in regions.maps:
            assert_partition_guarantees(rmap, k)


def test_auto_uses_vlm_features_without_dino_weights(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))  # an empty cache: no DINO weights on this "machine"
    monkeypatch.delenv("HF_VATTR_DINOV3_WEIGHTS", raising=False)
    model, proc = tiny_vlm("qwen3_vl")
    img = photo("chelsea")
    inputs = example_inputs(proc, [Image.fromarray(img)])
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [img])
    regions = build_regions(layout, images=[img], model=model, inputs=inputs)
    assert regions.maps[0].method == "vlm" and "vision-tower" in regions.maps[0].info["auto"]
    assert choose_method(images=[img])[0] == "grid"
    assert choose_method(images=[img], weights="random")[0] == "dinov3"
    assert choose_method(masks=[np.zeros((2, 2), int)])[0] == "masks"
    # the streamer-facing API works on the result
    assert regions.membership().shape == (layout.num_visual_tokens, regions.num_regions)
    assert regions.token_masks().sum() == layout.num_visual_tokens


# --------------------------------------------------------------------------- DINO


@pytest.mark.parametrize("method,patch", [("dinov3", 16), pytest.param("dinov2", 14, marks=pytest.mark.slow)])
def test_dino_patch_grid_is_aligned_with_the_token_grid(method, patch):
    img = photo("chelsea")  # 300 x 451
    tok = fake_tokens(11, 16, 28, img.shape[:2])
    ext = TimmPatchFeatures(model_name={"dinov3": "vit_small_patch16_dinov3",
                                        "dinov2": "vit_small_patch14_reg4_dinov2"}[method],
                            weights="random", name=method)
    model, _ = ext._resolve()
    sizes = []
    handle = model.patch_embed.register_forward_pre_hook(lambda mod, args: sizes.append(tuple(args[0].shape[-2:])))
    try:
        feats = ext(img, tok)
        m = ext.choose_m(tok)
    finally:
        handle.remove()
    assert m == 2  # 176 tokens * 4 <= max_patches: two patches per token side
    assert sizes == [(11 * m * patch, 16 * m * patch)]
    assert feats.shape == (tok.num_tokens, 384)
    patches, m2 = ext.patch_features(img, tok)
    torch.testing.assert_close(feats[5 * 16 + 7], patches[10:12, 14:16].mean((0, 1)))
    # a big image falls back to one patch per token to stay fast
    assert ext.choose_m(fake_tokens(23, 32, 32)) == 1


def test_dinov3_random_weights_regions(tmp_path):
    img = photo("coffee")
    tok = fake_tokens(14, 21, 28, img.shape[:2])
    maps = build_regions(tok, "dinov3", k=[16, 32], images=img, weights="random")
    for k, rmap in maps.items():
        assert_partition_guarantees(rmap, k)
        assert rmap.info["weights"].startswith("random")


def test_dino_offline_without_weights_fails_fast_with_instructions(monkeypatch, tmp_path):
    import huggingface_hub.constants as hc

    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_VATTR_DINOV3_WEIGHTS", raising=False)
    img = photo("chelsea")
    tok = fake_tokens(11, 16, 28, img.shape[:2])
    start = time.perf_counter()
    with pytest.raises(WeightsUnavailableError) as err:
        build_regions(tok, "dinov3", images=img)
    assert time.perf_counter() - start < 5
    msg = str(err.value)
    assert "weights=" in msg and "hf download timm/vit_small_patch16_dinov3" in msg and "method='vlm'" in msg
    with pytest.raises(WeightsUnavailableError, match="does not exist"):
        build_regions(tok, "dinov2", images=img, weights=tmp_path / "nope.safetensors")


@pytest.mark.slow  # builds the ViT-S twice (~2-4 s each on 2 CPU cores)
def test_dino_weights_from_a_local_file_and_from_the_hf_cache(monkeypatch, tmp_path):
    """Real loading paths: a safetensors file given by path, and the same file in an HF-cache layout."""
    import huggingface_hub.constants as hc
    from safetensors.torch import save_file

    from hf_vattr.regions.features import _load_timm

    src, _ = _load_timm("vit_small_patch16_dinov3", "random")  # shared with the other tests
    state = {k: v.contiguous() for k, v in src.state_dict().items()}
    file = tmp_path / "dinov3_s.safetensors"
    save_file(state, str(file))
    img = photo("astronaut")
    tok = fake_tokens(8, 8, 32, img.shape[:2])
    ext = TimmPatchFeatures(weights=file)
    feats = ext(img, tok)
    assert ext.source == str(file)
    loaded, _ = ext._resolve()
    torch.testing.assert_close(loaded.state_dict()["blocks.0.attn.qkv.weight"], state["blocks.0.attn.qkv.weight"])
    assert feats.shape == (64, 384)

    cache = tmp_path / "hub"
    snap = cache / "models--timm--vit_small_patch16_dinov3.lvd1689m" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    (snap / "model.safetensors").write_bytes(file.read_bytes())
    (cache / "models--timm--vit_small_patch16_dinov3.lvd1689m" / "refs").mkdir()
    (cache / "models--timm--vit_small_patch16_dinov3.lvd1689m" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_VATTR_DINOV3_WEIGHTS", raising=False)
    path, where = find_local_weights("vit_small_patch16_dinov3")
    assert path is not None and path.name == "model.safetensors" and "cache" in where
    assert choose_method(images=[img])[0] == "dinov3"  # auto prefers DINOv3 once it is local
    rmap = build_regions(tok, images=img, k=8)
    assert rmap.method == "dinov3" and rmap.info["weights"] == str(path)
    torch.testing.assert_close(TimmPatchFeatures()(img, tok), feats)


# --------------------------------------------------------------------------- SLIC


@pytest.mark.parametrize("name", ["coffee", "astronaut"])
def test_slic_regions_guarantees(name):
    img = photo(name)
    tok = fake_tokens(15, 20, 28, img.shape[:2])
    maps = slic_regions(tok, img, [16, 32, 64])
    for k, rmap in maps.items():
        got = rmap.num_regions
        if got < k:
            assert rmap.info["fewer_regions"]["got"] == got
        else:
            assert got == k
        assert_partition_guarantees(rmap, got)


def test_slic_missing_dependency_message(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "skimage.segmentation", None)
    monkeypatch.setitem(sys.modules, "skimage", None)
    with pytest.raises(ImportError, match="pip install scikit-image"):
        slic_regions(fake_tokens(4, 4, 28, (100, 100)), np.zeros((100, 100, 3), np.uint8), 4)


# --------------------------------------------------------------------------- user masks


def test_label_image_gives_pixel_overlap_membership():
    from skimage.segmentation import felzenszwalb

    img = photo("coffee")  # 400 x 600
    labels = felzenszwalb(img, scale=400, sigma=0.8, min_size=2000)
    tok = fake_tokens(13, 22, 28, img.shape[:2])  # 364 x 616 resized: scales 1.099 / 0.974
    rmap = build_regions(tok, "masks", masks=labels)
    k = len(np.unique(labels))
    assert rmap.num_regions == k and rmap.method == "masks"
    assert torch.allclose(rmap.membership.sum(1), torch.ones(tok.num_tokens))
    H, W = labels.shape
    for t in (0, 17, 100, tok.num_tokens - 1):  # brute force: fractions of the token's pixels in each label
        y0, x0, y1, x1 = tok.token_box_original(t)
        block = labels[np.ix_(pixel_rows_in(y0, y1, H), pixel_rows_in(x0, x1, W))]
        expect = np.bincount(block.ravel(), minlength=k) / block.size
        np.testing.assert_allclose(rmap.membership[t].numpy(), expect, atol=1e-6)


def test_boolean_masks_overlap_and_rest_region():
    img = photo("chelsea")  # 300 x 451
    tok = fake_tokens(10, 16, 28, img.shape[:2])
    a = np.zeros(img.shape[:2], bool)
    b = np.zeros(img.shape[:2], bool)
    a[:150, :300] = True
    b[100:, 200:] = True
    rmap = mask_regions(tok, [a, b], names=["left-top", "right-bottom"])
    assert rmap.num_regions == 3 and rmap.info["rest_region"] == 2
    assert rmap.info["overlapping_pixels"] == 50 * 100
    t = tok.token_at_original(120, 250)  # inside the overlap: split equally
    assert rmap.membership[t, 0] == pytest.approx(0.5, abs=1e-6) and rmap.membership[t, 1] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="rest=True"):
        mask_regions(tok, [a, b], rest=False)
    tiny = np.zeros(img.shape[:2], bool)
    tiny[5:8, 5:8] = True  # far smaller than a token
    small = mask_regions(tok, [tiny])
    assert small.info["regions_without_tokens"] == [0] and small.membership[0, 0] > 0
    with pytest.raises(ValueError, match="Masks are"):
        mask_regions(tok, [a[:-1]])


# --------------------------------------------------------------------------- multi-image prompts, serialization


def test_multi_image_prompt_each_image_its_own_map_and_roundtrip(tmp_path):
    model, proc = tiny_vlm("glm4v")
    imgs = [photo("astronaut"), photo("coffee")[:200], photo("chelsea")]
    inputs = example_inputs(proc, [Image.fromarray(i) for i in imgs])
    layout = visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], imgs)
    regions = build_regions(layout, "slic", k=6, images=imgs)
    assert isinstance(regions, PromptRegions) and len(regions.maps) == 3
    for im, rmap, img in zip(layout.images, regions.maps, imgs):
        assert rmap.image is im and rmap.pixel_masks().shape[1:] == img.shape[:2]
    # single-image entry with the prompt's image list picks its own image
    second = build_regions(layout.images[1], "color", k=5, images=imgs)
    assert second.image.image_index == 1 and second.num_regions == 5
    path = tmp_path / "regions.json"
    regions.save(path)
    again = PromptRegions.load(path)
    torch.testing.assert_close(again.membership(), regions.membership())
    assert [m.info for m in again.maps] == [m.info for m in regions.maps]
    assert again.layout.images[2].original_size == imgs[2].shape[:2]
    # fractional maps round-trip too
    soft = mask_regions(layout.images[0], [np.eye(*imgs[0].shape[:2], dtype=bool)])
    soft.save(tmp_path / "soft.json")
    torch.testing.assert_close(RegionMap.load(tmp_path / "soft.json").membership, soft.membership)
    # the existing grid default still works
    assert prompt_regions(layout, k=4).num_regions == 12


def test_region_map_rejects_bad_inputs():
    tok = fake_tokens(4, 4)
    with pytest.raises(ValueError, match="Unknown region method"):
        build_regions(tok, "kmeans")
    with pytest.raises(ValueError, match="needs model"):
        build_regions(tok, "vlm")
    with pytest.raises(ValueError, match="rows"):
        build_regions(tok, "features", features=torch.zeros(15, 3))
    with pytest.raises(ValueError, match="is"):
        build_regions(fake_tokens(4, 4, 28, (100, 100)), "color", images=np.zeros((90, 100, 3), np.uint8))
    assert math.isclose(build_regions(tok, "grid", k=99).info["requested_k"], 99)


def test_grid_k_must_be_positive():
    """k <= 0 is a mistake (a typo, an unset option), not a request for one region."""
    tok = fake_tokens(4, 4)
    for k in (0, -3):
        with pytest.raises(ValueError, match=f"k >= 1 regions per image, got k={k}"):
            grid_regions(tok, k)


def test_channel_first_array_is_sized_as_the_processor_reads_it(get_tiny):
    """A (3, H, W) numpy image is channel-first to the processor; the layout must not read it as H=3."""
    from hf_vattr.layouts import array_image_size
    from hf_vattr.testing import example_inputs

    model, proc = get_tiny("qwen2_5_vl")
    hwc = photo("astronaut")[40:250, 13:300].copy()  # 210 x 287
    chw = np.ascontiguousarray(hwc.transpose(2, 0, 1))
    layouts = []
    for image in (hwc, chw, Image.fromarray(hwc)):
        inputs = example_inputs(proc, [image])
        layouts.append(visual_layout(model, inputs["input_ids"], inputs["image_grid_thw"], [image]).images[0])
    assert [lay.original_size for lay in layouts] == [(210, 287)] * 3
    assert layouts[1].grid_hw == layouts[0].grid_hw
    assert layouts[1].token_box_original(5) == layouts[0].token_box_original(5)
    with pytest.raises(ValueError, match="channel axis"):
        array_image_size(np.zeros((5, 40, 60)))
