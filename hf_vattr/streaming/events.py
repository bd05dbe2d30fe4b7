"""What a streamer yields: token and span attributions, and the trace that keeps them.

A finished :class:`AttributionTrace` renders itself in Jupyter (``_repr_html_``, :meth:`~AttributionTrace.show`)
and round-trips through :meth:`~AttributionTrace.save` / :meth:`~AttributionTrace.load` as one safetensors
file (every number and image) next to one JSON file (text, structure, regions); no pickle. The format is
described in docs/visualisation.md.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import AttributionError
from ..regions import PromptRegions
from ..serialization import to_jsonable

__all__ = ["TokenAttribution", "SpanAttribution", "AttributionTrace", "NonFiniteScoresError", "TraceFileError",
           "TraceNotFoundError"]


class NonFiniteScoresError(AttributionError, ValueError):
    """Region scores hold NaN or infinity, so no region can be ranked."""


class TraceFileError(AttributionError, ValueError):
    """A saved trace's files are unreadable, incomplete, or do not belong together."""


class TraceNotFoundError(AttributionError, FileNotFoundError):
    """A saved trace's folder or one of its two files does not exist."""


@dataclass
class TokenAttribution:
    """One generated token and its region scores."""

    index: int  # position among this sequence's generated tokens
    token_id: int
    text: str  # decoded piece ("" for special tokens such as end-of-turn)
    region_scores: torch.Tensor  # (K,) float32 on CPU
    section: str  # "thinking" or "answer"
    features: torch.Tensor | None = None  # (L, H, K) when keep_features=True
    sequence: int = 0  # which sequence of the batch (row of generate's output)
    calibrated: bool = True  # False: streamed without an estimator (raw value-norm attention, hf_vattr.viz.UNCALIBRATED_NOTE)

    @property
    def uncalibrated(self) -> bool:
        return not self.calibrated

    @property
    def token(self) -> str:
        return self.text

    def __iter__(self):  # allows `token, scores = event`
        yield self.text
        yield self.region_scores


@dataclass
class SpanAttribution:
    """One finished reasoning step (or answer span) and its region scores."""

    index: int  # span number within its sequence
    text: str
    token_range: tuple[int, int]  # [start, end) among the sequence's generated tokens
    region_scores: torch.Tensor  # (K,) float32 on CPU: mean of the tokens' scores
    section: str
    sequence: int = 0
    inherited: bool = False  # True: an answer whose scores include the thinking steps' (LinearEstimator.inherited)
    calibrated: bool = True  # False: streamed without an estimator (raw value-norm attention, hf_vattr.viz.UNCALIBRATED_NOTE)

    @property
    def uncalibrated(self) -> bool:
        return not self.calibrated

    def top_regions(self, k: int = 3) -> list[int]:
        """The ``k`` regions with the highest scores, best first (refused when a score is NaN or infinite)."""
        scores = torch.as_tensor(self.region_scores)
        bad = ~torch.isfinite(scores)
        if bool(bad.any()):
            raise NonFiniteScoresError(
                f"Span {self.index} (sequence {self.sequence}) has {int(bad.sum())} non-finite region scores "
                f"(region {int(bad.nonzero()[0, 0])} is {float(scores[bad][0])}), so its top regions would be "
                "arbitrary. Check the estimator's weights (LinearEstimator.check_finite) and the features.")
        from ..viz.scores import ranked_regions

        return ranked_regions(scores, k)

    def __iter__(self):
        yield self.text
        yield self.region_scores


@dataclass
class AttributionTrace:
    """Everything a streamer produced for one sequence: tokens, spans and the regions they refer to."""

    regions: PromptRegions | None  # None until generation starts with regions="prefill"
    tokens: list[TokenAttribution] = field(default_factory=list)
    spans: list[SpanAttribution] = field(default_factory=list)
    prompt_text: str = ""
    sequence: int = 0
    images: list | None = None  # the images the user passed for this sequence (PIL, arrays or (h, w)), if any
    calibrated: bool = True  # False: scored without an estimator (raw value-norm attention, hf_vattr.viz.UNCALIBRATED_NOTE)

    @property
    def uncalibrated(self) -> bool:
        """True when the scores are raw value-norm attention (no estimator): rankings, not predicted nats."""
        return not self.calibrated

    @property
    def text(self) -> str:
        return "".join(t.text for t in self.tokens)

    def token_scores(self) -> torch.Tensor:
        """(T, K) token-by-region score matrix."""
        if not self.tokens:
            return torch.zeros(0, self.regions.num_regions if self.regions is not None else 0)
        return torch.stack([t.region_scores for t in self.tokens])

    def span_scores(self) -> torch.Tensor:
        """(S, K) span-by-region score matrix (a reasoning trajectory)."""
        if not self.spans:
            return torch.zeros(0, self.regions.num_regions if self.regions is not None else 0)
        return torch.stack([s.region_scores for s in self.spans])

    # ------------------------------------------------------------------ display
    def _repr_html_(self) -> str:
        """Jupyter's rich display: the step table with overlays inline (hf_vattr.viz.trace_table_html)."""
        from ..viz import trace_table_html

        return trace_table_html(self)

    def show(self, *, top_k: int = 3, trajectory: bool = True) -> None:
        """Display the step table (and the trajectory plot) inline in Jupyter; print a text table elsewhere."""
        from ..viz import trace_table_html, trajectory_plot

        shell = None
        try:
            from IPython import get_ipython

            shell = get_ipython()
        except ImportError:
            pass
        if shell is not None and getattr(shell, "kernel", None) is not None:
            from IPython.display import HTML, display

            display(HTML(trace_table_html(self, top_k=top_k)))
            if trajectory and self.spans:
                display(trajectory_plot(self))
            return
        print(self.summary(top_k=top_k))

    def summary(self, *, top_k: int = 3) -> str:
        """A plain-text table: one line per step with its evidence label and top regions in words."""
        from ..viz import UNCALIBRATED_NOTE, describe_location, format_score, span_evidence, top_positive_regions

        lines = [f"({UNCALIBRATED_NOTE})"] if self.uncalibrated else []
        for span in self.spans:
            where = ", ".join(f"{describe_location(self.regions, r)} ({format_score(float(span.region_scores[r]))})"
                              for r in top_positive_regions(span, top_k))
            lines.append(f"[{span.index}] {span.section:8s} {span_evidence(span, self):8s} "
                         f"{span.text.strip()!r}: {where or 'no region with positive effect'}")
        return "\n".join(lines) if self.spans else "\n".join([*lines, "(no finished steps)"])

    # ------------------------------------------------------------------ save / load
    def save(self, path: str | Path) -> Path:
        """Write the trace to the folder ``path``: ``trace.json`` + ``trace.safetensors`` (no pickle).

        JSON holds the text and structure (token ids, pieces, sections, span ranges, the regions via
        ``PromptRegions.to_dict``, how each image is stored); safetensors holds every number: token and
        span scores, token features when kept, and the images' pixels (a video's frames, as the trace keeps
        them: one array, or a list of frames stacked). :meth:`load` restores all of it.
        """
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        tensors: dict[str, torch.Tensor] = {}
        if self.tokens:
            tensors["token_scores"] = torch.stack([t.region_scores.detach().cpu() for t in self.tokens])
        if self.spans:
            tensors["span_scores"] = torch.stack([s.region_scores.detach().cpu() for s in self.spans])
        with_features = [i for i, t in enumerate(self.tokens) if t.features is not None]
        if with_features:
            tensors["token_features"] = torch.stack([self.tokens[i].features.detach().cpu() for i in with_features])
        images_meta = None if self.images is None else [_save_image(im, i, tensors) for i, im in enumerate(self.images)]
        regions_meta = None
        if self.regions is not None:
            regions_meta = self.regions.to_dict()
            regions_meta["layout"]["extras"] = to_jsonable(self.regions.layout.extras)
        meta = {
            "format": TRACE_FORMAT, "version": TRACE_FORMAT_VERSION,
            "prompt_text": self.prompt_text, "sequence": self.sequence,
            "num_regions": None if self.regions is None else self.regions.num_regions,
            "tokens": [{"index": t.index, "token_id": int(t.token_id), "text": t.text, "section": t.section,
                        "sequence": t.sequence} for t in self.tokens],
            "features_of": with_features,
            "spans": [{"index": s.index, "text": s.text, "token_range": list(s.token_range), "section": s.section,
                       "sequence": s.sequence, **({"inherited": True} if s.inherited else {})} for s in self.spans],
            "regions": regions_meta,
            "images": images_meta,
            **({} if self.calibrated else {"calibrated": False}),  # omitted when calibrated: older files keep their bytes
        }
        trace_id = _tensors_digest(tensors)
        meta["trace_id"] = trace_id
        (folder / "trace.json").write_text(json.dumps(meta, ensure_ascii=False, indent=1), encoding="utf-8")
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "trace.safetensors"),
                  metadata={"format": TRACE_FORMAT, "version": str(TRACE_FORMAT_VERSION), "trace_id": trace_id,
                            "num_tokens": str(len(self.tokens)), "num_spans": str(len(self.spans))})
        return folder

    @classmethod
    def load(cls, path: str | Path) -> "AttributionTrace":
        """Read a trace written by :meth:`save`.

        Both files are checked against each other before anything is built: the shared ``trace_id`` (a digest
        of the numbers, written into both, and recomputed from the numbers read), and the token, span, region
        and image counts. A missing, truncated
        or foreign file, or a missing field, raises :class:`TraceFileError` / :class:`TraceNotFoundError`
        naming the file and the field.
        """
        folder = Path(path)
        json_path, st_path = folder / "trace.json", folder / "trace.safetensors"
        if not folder.is_dir():
            raise TraceNotFoundError(f"No trace folder at {folder}; pass the folder given to trace.save(...).")
        for file in (json_path, st_path):
            if not file.is_file():
                raise TraceNotFoundError(f"{file} is missing; a saved trace is trace.json and trace.safetensors "
                                         "side by side. Save the trace again.")
        meta = _read_trace_json(json_path)
        tensors, st_meta = _read_trace_tensors(st_path)
        _check_trace_files(meta, tensors, st_meta, json_path, st_path)
        try:
            regions = None
            if meta["regions"] is not None:
                regions = PromptRegions.from_dict(meta["regions"])
                regions.layout.extras = dict(meta["regions"]["layout"].get("extras") or {})
            features = dict(zip(meta.get("features_of", []), tensors.get("token_features", [])))
            calibrated = meta.get("calibrated", True) is not False
            tokens = [TokenAttribution(index=t["index"], token_id=t["token_id"], text=t["text"],
                                       region_scores=tensors["token_scores"][i].clone(), section=t["section"],
                                       features=None if i not in features else features[i].clone(),
                                       sequence=t["sequence"], calibrated=calibrated) for i, t in enumerate(meta["tokens"])]
            spans = [SpanAttribution(index=s["index"], text=s["text"], token_range=tuple(s["token_range"]),
                                     region_scores=tensors["span_scores"][i].clone(), section=s["section"],
                                     sequence=s["sequence"], inherited=bool(s.get("inherited", False)),
                                     calibrated=calibrated)
                     for i, s in enumerate(meta["spans"])]
            images = None if meta["images"] is None else [_load_image(m, tensors) for m in meta["images"]]
        except TraceFileError:
            raise
        except (KeyError, TypeError, ValueError, IndexError, AttributeError) as e:
            what = f"lacks the field {e.args[0]!r}" if isinstance(e, KeyError) else f"is malformed ({e})"
            raise TraceFileError(f"{json_path} {what}; it was edited or not written by AttributionTrace.save. "
                                 "Save the trace again.") from e
        return cls(regions, tokens, spans, prompt_text=meta["prompt_text"], sequence=meta["sequence"], images=images,
                   calibrated=calibrated)


_REQUIRED_TRACE_FIELDS = ("format", "tokens", "spans", "regions", "images", "prompt_text", "sequence")


def _read_trace_json(json_path: Path) -> dict:
    try:
        meta = json.loads(json_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TraceFileError(f"{json_path} is not valid JSON ({e}); it is truncated or damaged. Save the trace "
                             "again.") from e
    if not isinstance(meta, dict):
        raise TraceFileError(f"{json_path} holds a JSON {type(meta).__name__}, not a trace.")
    if meta.get("format") != TRACE_FORMAT:
        raise TraceFileError(f"{json_path.parent} does not hold an hf_vattr trace (format {meta.get('format')!r}).")
    try:
        version = int(meta.get("version", 0))
    except (TypeError, ValueError):
        raise TraceFileError(f"{json_path}: version {meta.get('version')!r} is not a number.") from None
    if version > TRACE_FORMAT_VERSION:
        raise TraceFileError(f"{json_path.parent} was written by a newer hf_vattr (trace format {version}); upgrade.")
    missing = [name for name in _REQUIRED_TRACE_FIELDS if name not in meta]
    if missing:
        raise TraceFileError(f"{json_path} lacks the field{'s' if len(missing) > 1 else ''} {', '.join(missing)}; "
                             "it was edited or not written by AttributionTrace.save. Save the trace again.")
    for name in ("tokens", "spans"):
        if not isinstance(meta[name], list):
            raise TraceFileError(f"{json_path}: {name!r} must be a list, got {type(meta[name]).__name__}.")
    return meta


def _read_trace_tensors(st_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    try:
        with safe_open(str(st_path), framework="pt") as f:
            st_meta = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as e:  # SafetensorError (empty / truncated file), OSError
        raise TraceFileError(f"{st_path} is not a readable safetensors file ({type(e).__name__}: {e}); it is "
                             "truncated or damaged. Save the trace again.") from e
    if st_meta.get("format", TRACE_FORMAT) != TRACE_FORMAT:
        raise TraceFileError(f"{st_path} is not an hf_vattr trace's tensors (format {st_meta.get('format')!r}).")
    return tensors, st_meta


def _check_trace_files(meta: dict, tensors: dict[str, torch.Tensor], st_meta: dict[str, str], json_path: Path,
                       st_path: Path) -> None:
    """The two files of a trace describe the same trace: shared id, and every count agrees."""
    redo = "The two files do not belong together (one was edited, truncated or copied from another trace); " \
           "save the trace again."
    ids = (meta.get("trace_id"), st_meta.get("trace_id"))
    if ids != (None, None) and ids[0] != ids[1]:
        raise TraceFileError(f"{json_path} has trace_id {ids[0]!r} but {st_path} has {ids[1]!r}. {redo}")
    for name, entries, key in (("tokens", meta["tokens"], "token_scores"), ("spans", meta["spans"], "span_scores")):
        rows = int(tensors[key].shape[0]) if key in tensors else 0
        if entries and key not in tensors:
            raise TraceFileError(f"{st_path} lacks {key!r} for the {len(entries)} {name} of {json_path.name}. {redo}")
        if rows != len(entries):
            raise TraceFileError(f"{json_path} lists {len(entries)} {name} but {st_path} holds {rows} rows of {key}. "
                                 f"{redo}")
        recorded = st_meta.get(f"num_{name}")
        if recorded is not None and recorded != str(len(entries)):
            raise TraceFileError(f"{json_path} lists {len(entries)} {name} but {st_path} was saved with {recorded}. "
                                 f"{redo}")
        if key in tensors and meta.get("num_regions") is not None and tensors[key].dim() == 2 \
                and int(tensors[key].shape[1]) != int(meta["num_regions"]):
            raise TraceFileError(f"{json_path} says {meta['num_regions']} regions but {key} in {st_path} has "
                                 f"{int(tensors[key].shape[1])} columns. {redo}")
    features_of = meta.get("features_of", [])
    rows = int(tensors["token_features"].shape[0]) if "token_features" in tensors else 0
    if len(features_of) != rows:
        raise TraceFileError(f"{json_path} lists features for {len(features_of)} tokens but {st_path} holds {rows}. "
                             f"{redo}")
    for i, m in enumerate(meta["images"] or []):
        key = m.get("tensor") if isinstance(m, dict) else None
        if key is not None and key not in tensors:
            raise TraceFileError(f"{json_path}: image {i} is stored as {key!r}, which {st_path} lacks. {redo}")
    if ids[0] is not None and _tensors_digest(tensors) != ids[0]:
        raise TraceFileError(f"The numbers in {st_path} are not the ones saved with {json_path} (trace_id "
                             f"{ids[0]!r}): the file was changed or damaged after saving. Save the trace again.")


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """A short digest of every stored number (names, dtypes, shapes, bytes): the id both trace files carry."""
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:32]


TRACE_FORMAT = "hf_vattr.trace"
TRACE_FORMAT_VERSION = 1


_PIL_MODES = ("RGB", "RGBA", "L", "LA", "I", "F", "I;16")  # stored as they are; other modes converted


def _storable_pil(image: Any) -> tuple[Any, bool]:
    """(a PIL image whose pixels an array keeps, whether it had to be converted to RGB / RGBA)."""
    if image.mode in _PIL_MODES:
        return image, False
    return image.convert("RGBA" if "A" in image.mode or "transparency" in image.info else "RGB"), True


def _is_frame_list(image: Any) -> bool:
    """A video as a list of frames (PIL images, arrays or tensors), not a ``(h, w)`` size."""
    return isinstance(image, (list, tuple)) and len(image) > 0 and all(
        hasattr(f, "shape") or (hasattr(f, "mode") and hasattr(f, "size")) for f in image)


def _save_image(image: Any, i: int, tensors: dict[str, torch.Tensor]) -> dict:
    """Put one image's (or one video's frames') pixels into ``tensors`` and return how to rebuild it.

    A video kept as one array or tensor (``(T, H, W, C)``, as the streamer keeps the frames the vision tower saw)
    is stored like an image array; a list of frames as one stacked tensor (``"kind": "frames"``), PIL frames
    with their mode.
    """
    key = f"image.{i}"
    if image is None:
        return {"kind": "none"}
    if isinstance(image, (tuple, list)) and len(image) == 2 and all(isinstance(v, (int, np.integer)) for v in image):
        return {"kind": "size", "size": [int(image[0]), int(image[1])]}
    from PIL import Image

    if isinstance(image, Image.Image):
        stored, converted = _storable_pil(image)
        tensors[key] = torch.from_numpy(np.array(stored))
        return {"kind": "pil", "mode": stored.mode, "tensor": key, "converted": converted}
    if _is_frame_list(image):
        return _save_frames(image, i, key, tensors)
    if isinstance(image, torch.Tensor):
        tensors[key] = image.detach().cpu().contiguous()
        return {"kind": "tensor", "tensor": key}
    arr = np.ascontiguousarray(np.asarray(image))
    tensors[key] = torch.from_numpy(arr.copy())
    return {"kind": "array", "tensor": key}


def _save_frames(frames: Any, i: int, key: str, tensors: dict[str, torch.Tensor]) -> dict:
    """One video given as a list of frames: stacked into one ``(T, ...)`` tensor; PIL frames in one mode."""
    from PIL import Image

    if all(isinstance(f, Image.Image) for f in frames):
        stored = [_storable_pil(f) for f in frames]
        converted = any(c for _, c in stored)
        modes = {f.mode for f, _ in stored}
        if len(modes) > 1:  # one tensor holds one mode: bring them all to RGB(A)
            alpha = any("A" in m for m in modes)
            stored, converted = [(f.convert("RGBA" if alpha else "RGB"), True) for f, _ in stored], True
        arrays, meta = [np.array(f) for f, _ in stored], {"pil": True, "mode": stored[0][0].mode,
                                                           "converted": converted}
    else:
        arrays = [f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f) for f in frames]
        meta = {"pil": False}
    shapes = sorted({a.shape for a in arrays})
    if len(shapes) > 1 or len({a.dtype for a in arrays}) > 1:
        raise ValueError(f"Video {i} has frames of different shapes or dtypes {shapes}: a video's frames share one "
                         "size and dtype (processors stack them), so they are stored as one tensor.")
    tensors[key] = torch.from_numpy(np.ascontiguousarray(np.stack(arrays)))
    return {"kind": "frames", "tensor": key, **meta}


def _pil_of(arr: np.ndarray, mode: str) -> Any:
    from PIL import Image

    image = Image.fromarray(arr)  # the array's dtype and shape determine the mode
    return image if image.mode == mode else image.convert(mode)


def _load_image(meta: dict, tensors: dict[str, torch.Tensor]) -> Any:
    kind = meta["kind"]
    if kind == "none":
        return None
    if kind == "size":
        return tuple(meta["size"])
    data = tensors[meta["tensor"]]
    if kind == "tensor":
        return data.clone()
    arr = data.numpy().copy()
    if kind == "array":
        return arr
    if kind == "pil":
        return _pil_of(arr, meta["mode"])
    if kind == "frames":
        return [_pil_of(frame, meta["mode"]) for frame in arr] if meta.get("pil") else list(arr)
    raise ValueError(f"Unknown stored image kind {kind!r}.")
