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
from typing import Any, Sequence

import torch
from transformers.utils import logging

from ..errors import AttributionError

from ..capture import AttentionCapture, CaptureError
from ..layouts import VisualLayout, _get_path, architecture_spec, input_device, visual_layout
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


def _row_inputs(model: Any, inputs: Any, images: Any) -> list[tuple[dict, Any]]:
    """Split batched processor outputs into per-row inputs (input_ids, image_grid_thw, pixel_values) and images."""
    input_ids = _as_input_ids(inputs)
    batch = input_ids.shape[0]
    get = (lambda name: None) if isinstance(inputs, torch.Tensor) else inputs.get
    grid, pixels = get("image_grid_thw"), get("pixel_values")
    if batch == 1:
        return [({"input_ids": input_ids, "image_grid_thw": grid, "pixel_values": pixels}, images)]
    config = model.config
    spec = architecture_spec(config)
    image_token = int(_get_path(config, spec.image_token_id))
    merge = int(_get_path(config, spec.merge_size))
    grid = torch.as_tensor(grid if grid is not None else torch.zeros(0, 3, dtype=torch.long))
    tokens_per_image = (grid.prod(-1) // merge**2).tolist()
    patches_per_image = grid.prod(-1).tolist()
    if images is not None and len(images) == batch and all(isinstance(i, (list, tuple)) for i in images):
        per_row_images = list(images)
    else:
        per_row_images = None
    rows, image, patch, counts = [], 0, 0, []
    for b in range(batch):
        want, first, first_patch = int((input_ids[b] == image_token).sum()), image, patch
        while want > 0 and image < len(tokens_per_image):
            want -= tokens_per_image[image]
            patch += patches_per_image[image]
            image += 1
        if want != 0:
            raise ValueError(f"Row {b} of input_ids holds image tokens that image_grid_thw does not account for. "
                             "Were input_ids and image_grid_thw produced by the same processor call?")
        row = {"input_ids": input_ids[b:b + 1], "image_grid_thw": grid[first:image],
               "pixel_values": None if pixels is None else pixels[first_patch:patch]}
        counts.append(image - first)
        if per_row_images is not None:
            row_images = per_row_images[b]
        else:
            row_images = None if images is None else list(images)[first:image]
        rows.append((row, row_images))
    if per_row_images is None and images is not None and len(images) != image:
        raise StreamerInputError(
            f"Got {len(images)} image(s) for a batch of {batch} rows holding "
            + ", ".join(f"row {b}: {n} image(s)" for b, n in enumerate(counts))
            + f" ({image} in all). Pass every image in batch order, or one list of images per row.")
    return rows


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
        regions: as for :class:`~hf_vattr.streaming.streamer.AttributionStreamer`; for batches, a method name or one
            region spec per row.
        grid_k: regions per image of the default grid.
    Nothing is hooked or switched until :meth:`attach` (in the thread that runs ``generate``) and :meth:`open`
    (at the prompt); :meth:`close` undoes both.
    """

    def __init__(self, model: Any, inputs: Any, *, estimator: Any = None, images: Any = None,
                 regions: Any = None, grid_k: int = 16) -> None:
        self.model = model
        self._thread_id: int | None = None  # the thread whose generate this session serves
        rows = _row_inputs(model, inputs, images)
        self.images: list[Any] = [None if row_images is None else list(row_images) for _, row_images in rows]
        self.layouts: list[VisualLayout] = [
            visual_layout(model, row["input_ids"], row["image_grid_thw"], row_images) for row, row_images in rows]
        self._recorder: Any = None
        self._wants_prefill_regions = False
        if isinstance(regions, str) and regions == "prefill":
            if any(row["pixel_values"] is None for row, _ in rows):
                raise ValueError('regions="prefill" needs inputs with pixel_values (images in the prompt); '
                                 'pass region maps or another method such as regions="grid".')
            self._wants_prefill_regions = True
            self.regions: list[PromptRegions | None] = [None] * len(rows)
        else:
            specs = regions if (len(rows) > 1 and isinstance(regions, (list, tuple))
                                and not isinstance(regions[0], RegionMap)) else [regions] * len(rows)
            if len(specs) != len(rows):
                raise ValueError(f"Got region specs for {len(specs)} rows, the batch has {len(rows)}.")
            self.regions = [self._resolve_regions(spec, layout, grid_k, row, row_images)
                            for spec, layout, (row, row_images) in zip(specs, self.layouts, rows)]
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
                    f"Region map {i} covers {m.image.num_tokens} visual tokens but image {i} of the prompt has "
                    f"{im.num_tokens}. Build the region maps from this prompt's layout."
                )
        return PromptRegions(layout, list(maps))

    def _regions_from_vision_output(self, features: list[torch.Tensor]) -> None:
        """Runs inside the prefill's vision-tower hook: cluster, then hand the membership to the capture."""
        if threading.get_ident() != self._thread_id:
            return  # a vision pass of another thread running the same model: not ours
        self._release_recorder()  # one-shot
        from ..regions import build_regions

        want = [im.num_tokens for layout in self.layouts for im in layout.images]
        got = [int(f.shape[0]) for f in features]
        if got != want:
            error = ValueError(
                f'regions="prefill" saw a vision-tower call for images with {got} visual tokens, but the prompt has '
                f"{want}. Create the streamer right before generate(...) with the same inputs."
            )
            raise error
        start = 0
        for b, layout in enumerate(self.layouts):
            n = len(layout.images)
            regions = build_regions(layout, method="features", features=features[start:start + n])
            for rmap in regions.maps:
                rmap.info["features"] = "vision tower output recorded during generate's prefill"
            self.regions[b] = regions
            start += n
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
