"""The region map: which visual token belongs to which region, and where regions are in pixels.

A :class:`RegionMap` partitions the visual tokens of *one* image (or video) into K
regions. Attribution is computed per region, so everything downstream (capture
pooling, estimator scores, ablations, overlays) speaks in region indices.
:class:`PromptRegions` stacks the maps of all images and videos of a prompt into one
global region index (item 0's regions first). A video's region may span several frame
groups; :meth:`RegionMap.region_time_span` says which seconds it covers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..layouts import ImageTokens, VisualLayout

__all__ = ["RegionMap", "PromptRegions", "grid_regions", "prompt_regions"]


def _image_to_dict(im: ImageTokens) -> dict:
    data = {
        "image_index": im.image_index,
        "positions": im.positions.tolist(),
        "grid_thw": list(im.grid_thw),
        "token_size": im.token_size,
        "original_size": None if im.original_size is None else list(im.original_size),
    }
    if im.is_video or im.kind_index != im.image_index:  # images of image-only prompts keep their bytes
        data.update(kind=im.kind, kind_index=im.kind_index,
                    frame_times=None if im.frame_times is None else list(im.frame_times), frame_step=im.frame_step)
    return data


def _image_from_dict(im: dict) -> ImageTokens:
    return ImageTokens(
        image_index=int(im["image_index"]),
        positions=torch.tensor(im["positions"], dtype=torch.long),
        grid_thw=tuple(int(v) for v in im["grid_thw"]),
        token_size=int(im["token_size"]),
        original_size=None if im["original_size"] is None else tuple(int(v) for v in im["original_size"]),
        kind=im.get("kind", "image"),
        kind_index=im.get("kind_index"),
        frame_times=None if im.get("frame_times") is None else tuple(float(v) for v in im["frame_times"]),
        frame_step=im.get("frame_step"),
    )


@dataclass
class RegionMap:
    """K regions over one image's visual tokens.

    ``membership`` (tokens x K) is fractional so that methods computed at a finer
    resolution than the token grid (pixel masks, superpixels) can share a token
    between regions; rows sum to 1. ``assignment`` is its arg-max.
    """

    image: ImageTokens
    membership: torch.Tensor  # (N_tokens, K) float, rows sum to 1
    method: str = "grid"
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        m = torch.as_tensor(self.membership, dtype=torch.float32)
        if m.dim() != 2 or m.shape[0] != self.image.num_tokens:
            raise ValueError(
                f"membership must be (num_tokens={self.image.num_tokens}, K), got {tuple(m.shape)}."
            )
        # checked in NumPy: these small reductions are slower through torch's thread pool on a busy CPU
        a = m.detach().cpu().numpy()
        if (a < 0).any() or not np.allclose(a.sum(1), 1.0, rtol=0.0, atol=1e-4):
            raise ValueError("membership rows must be non-negative and sum to 1 (every token fully covered).")
        self.membership = m

    @classmethod
    def from_assignment(cls, image: ImageTokens, assignment: Sequence[int] | torch.Tensor, method: str = "custom",
                        info: dict | None = None) -> "RegionMap":
        """Hard partition from one region label per token (labels are renumbered 0..K-1 in order of appearance)."""
        labels = torch.as_tensor(np.asarray(assignment), dtype=torch.long).flatten()
        _, inverse = torch.unique(labels, sorted=True, return_inverse=True)
        k = int(inverse.max()) + 1
        membership = torch.zeros(labels.numel(), k)
        membership[torch.arange(labels.numel()), inverse] = 1.0
        return cls(image, membership, method, dict(info or {}))

    @property
    def num_regions(self) -> int:
        return int(self.membership.shape[1])

    @property
    def assignment(self) -> torch.Tensor:
        """(N_tokens,) hard region index of each token."""
        return self.membership.argmax(1)

    def token_grid(self, group: int = 0) -> torch.Tensor:
        """(h, w) region label of each token of frame group ``group`` (an image has one), in the token grid."""
        h, w = self.image.grid_hw
        return self.assignment[self.image.frame_group_tokens(group)].reshape(h, w)

    def pixel_labels(self, group: int = 0) -> np.ndarray:
        """(H, W) region label per pixel of the *original* image or video frame (resized if the size is unknown),
        in frame group ``group`` of a video."""
        grid = self.token_grid(group)
        if self.image.original_size is None:
            u = self.image.token_size
            return grid.repeat_interleave(u, 0).repeat_interleave(u, 1).numpy()
        ys, xs = self.image.grid_to_original_index()
        return grid[ys][:, xs].numpy()

    def pixel_masks(self, group: int = 0) -> np.ndarray:
        """(K, H, W) boolean masks at the original image resolution (of frame group ``group``), for drawing."""
        labels = self.pixel_labels(group)
        return labels[None] == np.arange(self.num_regions)[:, None, None]

    def region_groups(self, region: int) -> list[int]:
        """The frame groups holding tokens of ``region`` (hard assignment); ``[0]`` for an image's regions."""
        if not 0 <= int(region) < self.num_regions:
            raise IndexError(f"region {region} out of range 0..{self.num_regions - 1}")
        tokens = torch.nonzero(self.assignment == int(region)).flatten()
        return sorted({int(t) // self.image.tokens_per_group for t in tokens.tolist()})

    def region_time_span(self, region: int) -> tuple[float, float] | None:
        """``(start, end)`` seconds of the frame groups ``region`` covers (a video's); ``None`` for an image."""
        groups = self.region_groups(region)
        if not self.image.is_video or not groups:
            return None
        return self.image.frame_group_span(groups[0])[0], self.image.frame_group_span(groups[-1])[1]

    @property
    def is_hard(self) -> bool:
        """True when every token belongs to exactly one region (membership is one-hot)."""
        a = self.membership.detach().cpu().numpy()
        return bool(((a == 0) | (a == 1)).all())

    def region_sizes(self) -> torch.Tensor:
        """(K,) number of tokens whose hard assignment is each region."""
        return torch.bincount(self.assignment, minlength=self.num_regions)

    def to_dict(self) -> dict:
        """JSON-ready dict; hard maps store one label per token instead of the (N, K) matrix."""
        data: dict = {"method": self.method, "info": self.info, "image": _image_to_dict(self.image),
                      "num_regions": self.num_regions}
        if self.is_hard:
            data["assignment"] = self.assignment.tolist()
        else:
            data["membership"] = self.membership.tolist()
        return data

    @classmethod
    def from_dict(cls, data: dict) -> "RegionMap":
        image = _image_from_dict(data["image"])
        if "membership" in data:
            membership = torch.tensor(data["membership"], dtype=torch.float32)
        else:
            labels = torch.tensor(data["assignment"], dtype=torch.long)
            k = int(data.get("num_regions", int(labels.max()) + 1))
            membership = torch.zeros(labels.numel(), k)
            membership[torch.arange(labels.numel()), labels] = 1.0
        return cls(image, membership, data["method"], data.get("info", {}))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "RegionMap":
        return cls.from_dict(json.loads(Path(path).read_text()))


def grid_regions(image: ImageTokens, k: int = 16) -> RegionMap:
    """A regular grid of exactly ``min(k, tokens)`` rectangular regions over the token grid (per frame group).

    A video gets the grid in each of its ``t`` frame groups: ``t * min(k, h * w)`` regions, group by group, each
    a cell of one group (attribution then says where *and when*).

    A ``k`` above the token count is capped; ``info["requested_k"]`` and ``info["k_capped_by_tokens"]``
    then record it, as for every region method.

    The fallback that needs nothing but the layout. Rows are chosen to match
    the image aspect ratio; when ``k`` is not rows x cols, rows differ by one
    column ("brick" layout) so the count is still exactly ``k``. Every cell
    is a rectangle of tokens, hence contiguous.
    """
    h, w = image.grid_hw
    if int(k) < 1:
        raise ValueError(f"grid regions need k >= 1 regions per image, got k={k}; pass a positive k (e.g. 16).")
    requested = int(k)
    k = min(requested, h * w)
    groups = image.num_frame_groups
    rows = int(round(np.sqrt(k * h / w)))
    rows = max(1, -(-k // w), min(h, rows, k))  # at least ceil(k / w) rows so no row needs more than w columns
    rows = min(rows, h)
    base, extra = divmod(k, rows)
    # put the wider rows in the middle of the image rather than all at the top
    order = sorted(range(rows), key=lambda i: abs(i - (rows - 1) / 2))
    cols_per_row = [0] * rows
    for rank, i in enumerate(order):
        cols_per_row[i] = base + (1 if rank < extra else 0)
    r_edges = np.linspace(0, h, rows + 1).round().astype(int)
    labels = np.empty((h, w), dtype=np.int64)
    start = 0
    for i in range(rows):
        c = cols_per_row[i]
        c_edges = np.linspace(0, w, c + 1).round().astype(int)
        col_of = np.searchsorted(c_edges, np.arange(w), side="right") - 1
        labels[r_edges[i]:r_edges[i + 1]] = start + col_of[None, :]
        start += c
    labels = np.concatenate([labels.reshape(-1) + g * k for g in range(groups)])  # one grid per frame group
    uniform = len(set(cols_per_row)) == 1
    info = {"rows": rows, "cols": cols_per_row[0] if uniform else max(cols_per_row), "cols_per_row": cols_per_row,
            "k": k, "clustering": "grid"}
    if image.is_video:
        info.update(frame_groups=groups, k_per_group=k)
    if k < requested:  # recorded as every method records it (regions.policy.resolve_k)
        info.update(requested_k=requested, k_capped_by_tokens=True)
    return RegionMap.from_assignment(image, labels, method="grid", info=info)


@dataclass
class PromptRegions:
    """The region maps of every image and video of a prompt, as one global region index."""

    layout: VisualLayout
    maps: list[RegionMap]

    def __post_init__(self) -> None:
        if len(self.maps) != len(self.layout.images):
            raise ValueError(f"Got {len(self.maps)} region maps for {len(self.layout.images)} images.")

    @property
    def num_regions(self) -> int:
        return sum(m.num_regions for m in self.maps)

    def region_offsets(self) -> list[int]:
        offsets, start = [], 0
        for m in self.maps:
            offsets.append(start)
            start += m.num_regions
        return offsets

    def region_owner(self, region: int) -> tuple[int, int]:
        """(item index: image or video, local region index) of a global region index."""
        for i, off in enumerate(self.region_offsets()):
            if off <= region < off + self.maps[i].num_regions:
                return i, region - off
        raise IndexError(f"region {region} out of range 0..{self.num_regions - 1}")

    def region_time_span(self, region: int) -> tuple[float, float] | None:
        """``(start, end)`` seconds a global region covers when it is a video's; ``None`` for an image's region."""
        item, local = self.region_owner(region)
        return self.maps[item].region_time_span(local)

    def membership(self) -> torch.Tensor:
        """(N_visual, K_total) block-diagonal membership over all visual tokens of the prompt."""
        return torch.block_diag(*[m.membership for m in self.maps])

    def token_masks(self) -> torch.Tensor:
        """(K_total, N_visual) bool: tokens whose hard assignment is each region (for ablation)."""
        hard = torch.block_diag(*[torch.nn.functional.one_hot(m.assignment, m.num_regions) for m in self.maps])
        return hard.T.bool()

    def to_dict(self) -> dict:
        lay = self.layout
        return {
            "layout": {"sequence_length": lay.sequence_length, "model_type": lay.model_type,
                       "images": [_image_to_dict(im) for im in lay.images]},
            "maps": [m.to_dict() for m in self.maps],
        }

    @classmethod
    def from_dict(cls, data: dict) -> "PromptRegions":
        lay = data["layout"]
        layout = VisualLayout(images=[_image_from_dict(im) for im in lay["images"]],
                              sequence_length=int(lay["sequence_length"]), model_type=lay.get("model_type", ""))
        maps = [RegionMap.from_dict(m) for m in data["maps"]]
        for m, im in zip(maps, layout.images):
            m.image = im  # share the layout's ImageTokens objects
        return cls(layout, maps)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict()))

    @classmethod
    def load(cls, path: str | Path) -> "PromptRegions":
        return cls.from_dict(json.loads(Path(path).read_text()))


def prompt_regions(layout: VisualLayout, maps: Sequence[RegionMap] | None = None, k: int = 16) -> PromptRegions:
    """Region maps for every image and video; a ``k``-region grid (per frame group) where none is given."""
    if maps is None:
        maps = [grid_regions(im, k) for im in layout.images]
    return PromptRegions(layout, list(maps))
