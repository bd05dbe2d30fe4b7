"""One attributed ``generate`` call: layouts, regions, attention capture and scoring.

Why a class apart from the streamer: everything here patches or hooks the model, so it has one
owner with one idempotent :meth:`AttributionSession.close` that releases all of it, whichever
thread calls it and however generation ended. The streamer only queues events.

Batches: every row of ``input_ids`` (left padding allowed) gets its own layout and regions;
``num_return_sequences`` copies rows the way ``generate`` does (each prompt ``n`` times in a row).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Mapping
from typing import Any, Sequence

import torch
from transformers.utils import logging

from ..errors import AttributionError

from ..capture import AttentionCapture, CaptureError
from ..layouts import (VideoInputError, VisualLayout, _get_path, architecture_spec, as_video_list, input_device,
                       is_video, video_frames, visual_layout, visual_token_masks)
from ..regions import PromptRegions, RegionMap, prompt_regions

logger = logging.get_logger(__name__)

__all__ = ["AttributionSession", "StreamerInputError"]

_REGION_FORMS = ("None (a grid of grid_k regions per image), an int K (a grid of K regions per image), a method name "
                 "such as \"grid\", \"vlm\", \"dinov3\", \"auto\" or \"prefill\", a PromptRegions, a RegionMap, or a list "
                 "of RegionMaps (one per image of the prompt); for a batch, one of these per row")


class StreamerInputError(AttributionError, ValueError):
    """The prompt, images or regions given for a stream do not fit together (or not the inputs it was built for)."""


def _as_input_ids(inputs: Any) -> torch.Tensor:
    input_ids = inputs if isinstance(inputs, torch.Tensor) else inputs["input_ids"]
    return input_ids if input_ids.dim() == 2 else input_ids[None]


#: per kind of visual item: its grid and pixel inputs in the processor's outputs
_KIND_INPUTS = {"image": ("image_grid_thw", "pixel_values"), "video": ("video_grid_thw", "pixel_values_videos")}
_ROW_KEYS = ("image_grid_thw", "pixel_values", "video_grid_thw", "pixel_values_videos", "second_per_grid_ts")


def _is_per_row(values: Any, batch: int, kind: str) -> bool:
    """One list per row (``[[a], [b, c]]``) rather than one flat list in batch order?"""
    if values is None or batch == 1 or len(values) != batch:
        return False
    if kind == "video":  # a video may itself be a list (of frames): a row's list holds videos, not frames
        return all(isinstance(v, (list, tuple)) and not is_video(v) for v in values)
    return all(isinstance(v, (list, tuple)) for v in values)


def _row_inputs(model: Any, inputs: Any, media: dict[str, Any]) -> list[tuple[dict, dict[str, Any]]]:
    """Split batched processor outputs into per-row inputs (input_ids, grids, pixels, ``second_per_grid_ts``) and
    each row's ``media`` (``images``, ``videos``, ``video_metadata``: one list per row, or flat in batch order)."""
    input_ids = _as_input_ids(inputs)
    batch = input_ids.shape[0]
    get = (lambda name: None) if isinstance(inputs, torch.Tensor) else inputs.get
    if batch == 1:
        metadata = media.get("video_metadata")
        media = {**media, "videos": as_video_list(media.get("videos")),
                 "video_metadata": [metadata] if isinstance(metadata, Mapping) else metadata}
        return [({"input_ids": input_ids, **{key: get(key) for key in _ROW_KEYS}}, media)]
    merge = int(_get_path(model.config, architecture_spec(model.config).merge_size))
    masks = [visual_token_masks(model, input_ids[b]) for b in range(batch)]
    rows: list[tuple[dict, dict[str, Any]]] = [({"input_ids": input_ids[b:b + 1]}, {}) for b in range(batch)]
    for k, (kind, (grid_key, pixel_key)) in enumerate(_KIND_INPUTS.items()):
        grid, pixels = get(grid_key), get(pixel_key)
        grid = torch.as_tensor(grid if grid is not None else torch.zeros(0, 3, dtype=torch.long)).reshape(-1, 3)
        tokens_per_item = (grid.prod(-1) // merge**2).tolist()
        patches_per_item = grid.prod(-1).tolist()
        item, patch, counts = 0, 0, []
        for b, (row, _) in enumerate(rows):
            want, first, first_patch = int(masks[b][k].sum()), item, patch
            while want > 0 and item < len(tokens_per_item):
                want -= tokens_per_item[item]
                patch += patches_per_item[item]
                item += 1
            if want != 0:
                raise ValueError(f"Row {b} of input_ids holds {kind} tokens that {grid_key} does not account for. "
                                 f"Were input_ids and {grid_key} produced by the same processor call?")
            row[grid_key] = grid[first:item]
            row[pixel_key] = None if pixels is None else pixels[first_patch:patch]
            if kind == "video":
                seconds = get("second_per_grid_ts")
                row["second_per_grid_ts"] = None if seconds is None else torch.as_tensor(seconds)[first:item]
            counts.append((first, item))
        names = ("images",) if kind == "image" else ("videos", "video_metadata")
        for name in names:
            values = media.get(name)
            if name == "videos" and values is not None and not _is_per_row(values, batch, kind):
                values = as_video_list(values)
            if name == "video_metadata" and isinstance(values, Mapping):
                values = [values]
            per_row = _is_per_row(values, batch, kind)
            if values is not None and not per_row and len(values) != item:
                what = f"{kind}(s)" if name != "video_metadata" else "video_metadata entries"
                raise StreamerInputError(
                    f"Got {len(values)} {what} for a batch of {batch} rows holding "
                    + ", ".join(f"row {b}: {last - first} {kind}(s)" for b, (first, last) in enumerate(counts))
                    + f" ({item} in all). Pass every {kind if name != 'video_metadata' else 'entry'} in batch order, "
                    f"or one list of {name.replace('_', ' ')} per row.")
            for b, (_, row_media) in enumerate(rows):
                first, last = counts[b]
                row_media[name] = None if values is None else (list(values[b]) if per_row else list(values)[first:last])
    return rows


def _item_media(layout: VisualLayout, images: Any, videos: Any) -> list[Any] | None:
    """One entry per visual item of the prompt, in prompt order: its image, or its video's frames (None if not given)."""
    if images is None and videos is None:
        return None
    given = {"image": images, "video": videos}
    return [None if given[im.kind] is None else given[im.kind][im.kind_index] for im in layout.images]


def _padded(tables: Sequence[torch.Tensor], shape: tuple[int, ...], fill: float = 0) -> torch.Tensor:
    out = torch.full((len(tables), *shape), fill, dtype=tables[0].dtype)
    for i, t in enumerate(tables):
        out[(i, *[slice(0, s) for s in t.shape])] = t
    return out


class AttributionSession:
    """Layouts, regions, capture and scoring for one ``generate`` call (one or many sequences).

    Args:
        model: the VLM that will generate.
        inputs: the processor outputs passed to ``generate`` (batched rows may be left-padded).
        estimator: a :class:`~hf_vattr.estimator.LinearEstimator`, or ``None`` for raw value-norm attention
            (uncalibrated: :attr:`calibrated` is False).
        images: original images (or ``(height, width)``) in prompt order; for batches, one list per row
            or one flat list in batch order.
        videos: the videos as the processor took them (per video a list of frames, a ``(T, H, W, C)`` array, a
            path, or its frames' ``(height, width)``), in prompt order; batches as ``images``.
        video_metadata: per video, what the processor was given or returned (``fps``; ``frames_indices`` where
            it sampled frames): times the frame groups and picks the frames the tower saw.
        regions: as for :class:`~hf_vattr.streaming.streamer.AttributionStreamer`; for batches, a method name or one
            region spec per row.
        grid_k: regions per image (per frame group of a video) of the default grid.
    Nothing is hooked or switched until :meth:`attach` (in the thread that runs ``generate``) and :meth:`open`
    (at the prompt); :meth:`close` undoes both.
    """

    def __init__(self, model: Any, inputs: Any, *, estimator: Any = None, images: Any = None, videos: Any = None,
                 video_metadata: Any = None, regions: Any = None, grid_k: int = 16) -> None:
        self.model = model
        self._thread_id: int | None = None  # the thread whose generate this session serves
        rows = _row_inputs(model, inputs, {"images": images, "videos": videos, "video_metadata": video_metadata})
        self.layouts: list[VisualLayout] = []
        self.images: list[Any] = []  # per row, per visual item in prompt order: its image or its video's frames
        for row, media in rows:
            frames = self._frames(media["videos"], media["video_metadata"])
            layout = visual_layout(model, row["input_ids"], row["image_grid_thw"], media["images"],
                                   video_grid_thw=row["video_grid_thw"], videos=frames,
                                   video_metadata=media["video_metadata"],
                                   second_per_grid_ts=row["second_per_grid_ts"])
            self.layouts.append(layout)
            self.images.append(_item_media(layout, media["images"], frames))
        self._recorder: Any = None
        self._wants_prefill_regions = False
        if isinstance(regions, str) and regions == "prefill":
            if any(row[pixels] is None for row, _ in rows for grid, pixels in _KIND_INPUTS.values()
                   if row[grid] is not None and len(row[grid])):
                raise ValueError('regions="prefill" needs inputs with pixel_values (images in the prompt) and '
                                 'pixel_values_videos (videos); pass region maps or another method such as '
                                 'regions="grid".')
            self._wants_prefill_regions = True
            self._prefill_features: dict[str, list[torch.Tensor]] = {}
            self.regions: list[PromptRegions | None] = [None] * len(rows)
        else:
            specs = regions if (len(rows) > 1 and isinstance(regions, (list, tuple))
                                and not isinstance(regions[0], RegionMap)) else [regions] * len(rows)
            if len(specs) != len(rows):
                raise ValueError(f"Got region specs for {len(specs)} rows, the batch has {len(rows)}.")
            self.regions = [self._resolve_regions(spec, layout, grid_k, row, media)
                            for spec, layout, (row, _), media in zip(specs, self.layouts, rows, self.images)]
        if estimator is not None:
            estimator.check_compatible(model)
            self.pooling = getattr(estimator, "pooling", "sum")
            self.feature_kind = getattr(estimator, "feature_kind", "attention")
            # A private copy on the model's device: scoring then never copies weights per token.
            estimator = copy.deepcopy(estimator).to(input_device(model)).eval()
        else:
            # The best untrained score measured on the toy: value-norm attention (attention times ||W_O^h v_j||),
            # mean over layers and heads (docs/streaming.md, "Without an estimator"). Labelled uncalibrated.
            logger.warning(
                "Attribution without an estimator scores regions by raw value-norm attention (mean over layers and "
                "heads): uncalibrated, a ranking of regions rather than a predicted effect. Load an estimator with "
                "LinearEstimator.from_pretrained(...)."
            )
            self.pooling = "sum"
            self.feature_kind = "value_norm"
        self.estimator = estimator
        self.calibrated = estimator is not None  # False: scores are labelled "uncalibrated" wherever they are shown
        self.capture: AttentionCapture | None = None
        self.row_of_sequence: list[int] = []
        self._lock = threading.Lock()

    @staticmethod
    def _frames(videos: list[Any] | None, metadata: Any) -> list[Any] | None:
        """Each video's frames as one array (paths decoded, the processor's sampled frames picked); sizes stay."""
        if videos is None:
            return None
        if isinstance(metadata, Mapping):
            metadata = [metadata]
        if metadata is not None and len(metadata) != len(videos):
            raise VideoInputError(f"Got video_metadata for {len(metadata)} videos but {len(videos)} videos; pass "
                                  "one entry per video, in prompt order (as to the processor).")
        out = []
        for j, video in enumerate(videos):
            indices = None if metadata is None or metadata[j] is None else dict(metadata[j]).get("frames_indices")
            out.append(video_frames(video, j, indices) if is_video(video) else video)  # a (height, width) stays
        return out

    # ------------------------------------------------------------------ regions
    def _resolve_regions(self, regions: Any, layout: VisualLayout, grid_k: int, row: dict, images: Any
                         ) -> PromptRegions:
        if regions is None:
            return prompt_regions(layout, k=grid_k)
        if isinstance(regions, int) and not isinstance(regions, bool):
            if regions < 1:
                raise StreamerInputError(f"regions={regions}: K must be at least 1 region per image.")
            return prompt_regions(layout, k=regions)
        if isinstance(regions, str):  # a method name: build them now, e.g. "vlm", "dinov3", "auto"
            from ..regions import build_regions

            k = grid_k if regions == "grid" else None  # grid_k is the grid's size; other methods choose their own K
            return build_regions(layout, method=regions, k=k, images=images, model=self.model, inputs=row)
        if isinstance(regions, PromptRegions):
            maps = regions.maps
        elif isinstance(regions, RegionMap):
            maps = [regions]
        elif isinstance(regions, (list, tuple)) and regions and all(isinstance(m, RegionMap) for m in regions):
            maps = list(regions)
        else:
            raise StreamerInputError(f"regions= got {type(regions).__name__}; it takes {_REGION_FORMS}.")
        for i, (m, im) in enumerate(zip(maps, layout.images)):
            if m.image.num_tokens != im.num_tokens:
                raise ValueError(
                    f"Region map {i} covers {m.image.num_tokens} visual tokens but {im.kind} {i} of the prompt has "
                    f"{im.num_tokens}. Build the region maps from this prompt's layout."
                )
        return PromptRegions(layout, list(maps))

    def _regions_from_vision_output(self, features: list[torch.Tensor]) -> None:
        """Runs inside the prefill's vision-tower hooks: cluster, then hand the membership to the capture.

        The models encode the images (one tower call), then the videos (one more): regions are built once the
        calls of every kind in the prompt were seen.
        """
        if threading.get_ident() != self._thread_id:
            return  # a vision pass of another thread running the same model: not ours
        from ..regions import build_regions

        items = [im for layout in self.layouts for im in layout.images]
        kinds = [kind for kind in _KIND_INPUTS if any(im.kind == kind for im in items)]
        kind = kinds[len(self._prefill_features)]
        want = [im.num_tokens for im in items if im.kind == kind]
        got = [int(f.shape[0]) for f in features]
        if sum(got) != sum(want) or (kind == "image" and got != want):
            self._release_recorder()
            error = ValueError(
                f'regions="prefill" saw a vision-tower call for {kind}s with {got} visual tokens, but the prompt has '
                f"{want}. Create the streamer right before generate(...) with the same inputs."
            )
            raise error
        self._prefill_features[kind] = list(torch.cat(features).split(want))  # a video's groups may come apart
        if len(self._prefill_features) < len(kinds):
            return
        self._release_recorder()  # every kind seen
        taken = dict.fromkeys(kinds, 0)
        for b, layout in enumerate(self.layouts):
            row_features = []
            for im in layout.images:
                row_features.append(self._prefill_features[im.kind][taken[im.kind]])
                taken[im.kind] += 1
            regions = build_regions(layout, method="features", features=row_features)
            for rmap in regions.maps:
                rmap.info["features"] = "vision tower output recorded during generate's prefill"
            self.regions[b] = regions
        if self.capture is not None:
            self.capture.set_membership(self._membership())

    def _release_recorder(self) -> None:
        if self._recorder is not None:
            self._recorder.__exit__(None, None, None)
            self._recorder = None

    # ------------------------------------------------------------------ tables
    def _positions(self) -> torch.Tensor:
        tables = [self.layouts[r].positions for r in self.row_of_sequence]
        return _padded(tables, (max(len(t) for t in tables),))

    def _membership(self) -> torch.Tensor:
        tables = [self.regions[r].membership() for r in self.row_of_sequence]  # type: ignore[union-attr]
        return _padded(tables, (max(t.shape[0] for t in tables), max(t.shape[1] for t in tables)))

    # ------------------------------------------------------------------ lifecycle
    def attach(self) -> None:
        """Called in the thread that runs ``generate``, before it starts: only that thread's passes are ours.

        ``regions="prefill"`` hooks the vision tower here (not at the first ``put``: generate may encode the
        images before it streams the prompt).
        """
        self._thread_id = threading.get_ident()
        if self._wants_prefill_regions and self.regions[0] is None:
            from ..regions import VisionFeatureRecorder

            self._recorder = VisionFeatureRecorder(self.model, on_record=self._regions_from_vision_output)
            self._recorder.__enter__()

    def open(self, num_sequences: int) -> None:
        """Start capturing for ``num_sequences`` rows (generate's expanded batch), in generate's thread."""
        rows = len(self.layouts)
        if num_sequences % rows:
            raise ValueError(f"generate runs {num_sequences} sequences for {rows} prompt rows.")
        copies = num_sequences // rows
        self.row_of_sequence = [s // copies for s in range(num_sequences)]
        ready = all(r is not None for r in self.regions)
        self.capture = AttentionCapture(self.model, self._positions(), self._membership() if ready else None,
                                        pooling=self.pooling, feature_kind=self.feature_kind)
        self.capture.start()

    def close(self) -> None:
        """Release the capture and the vision hook; idempotent and safe from any thread."""
        with self._lock:
            if self.capture is not None:
                self.capture.stop()
            self._release_recorder()

    # ------------------------------------------------------------------ per step
    def scores(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Features ``(B, L, H, K)`` of the latest forward and their region scores ``(B, K)``, on the model's device."""
        if self.capture is None:
            raise CaptureError("The session was not opened.")
        features = self.capture.pop()
        if self.estimator is None:
            return features, features.mean(dim=(1, 2))
        return features, self.estimator(features)
