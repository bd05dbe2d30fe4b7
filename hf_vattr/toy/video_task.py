"""The toy video task: short clips of coloured shapes that move, appear or disappear.

Same canvas as :mod:`hf_vattr.toy.task` (192 x 192 px frames, a 3 x 3 layout of 64 px cells,
each object inside one 32 px Qwen3-VL visual token of its cell, colours red / green / blue /
black, shapes circle / square / triangle / cross). A clip has 4, 6 or 8 frames at 2 fps. The
vision tower fuses 2 consecutive frames into one *frame group* (``temporal_patch_size``), so the
scene changes only between groups: both frames of a group are identical, and every visual token
of a group sees one still picture. A clip of ``T`` frames has ``T / 2`` groups of 6 x 6 tokens.

Each object has a track: its cell in every frame group, or none while it is not in the clip.
Objects move (cell by cell along a straight line), stay, appear (absent in the first groups) or
disappear (absent in the last groups); two objects never share a cell in a group. Every thinking
step names exactly one object (by colour) at one time, the start (first group) or the end (last
group), and where it is then::

    <think>
    At the start the red object is at the top left.
    At the end the red object is at the bottom right.
    </think>
    down and right

Question kinds (drawn uniformly)::

    move   "Where did the red object move?"                  its cell at the start, at the end
                                                             -> up / down / left / right / "down and right" ...
    order  "Which appeared first, the red object or the      the one there at the start; the other one at the end
            blue object?"                                    -> a colour (the first or second named, 50/50)

Ground truth per step: ``step_objects[i]`` (object index), ``step_groups[i]`` (the frame groups the
step is about, one), ``step_cells[i]`` (row, col) and ``step_evidence_masks[i]`` (bool, groups x H x W,
the object's pixels in that group only), so a pointing test can ask whether a step's top region is on
the right object in the right frame group (:func:`region_on_evidence`).

Everything is deterministic from a seed, like :mod:`hf_vattr.toy.task`: ``make_video_example(seed)``
rebuilds the same clip and ``make_video_examples(n, seed)`` the same list. The image task is untouched.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .task import (CELL, COLOURS, GRID, IMAGE_SIZE, OBJECT_SIZE, SHAPES, TOKEN, ThinkingTarget, _bbox,
                   _draw_mask, _jitter_rgb, check_answer, example_seed, parse_trace, position_name)

__all__ = [
    "VIDEO_FRAMES",
    "VIDEO_FPS",
    "FRAMES_PER_GROUP",
    "VIDEO_KINDS",
    "TIME_NAMES",
    "VideoObject",
    "VideoExample",
    "make_video_example",
    "make_video_examples",
    "video_prompt_messages",
    "video_step_object",
    "video_evidence_for_step",
    "region_on_evidence",
    "motion_name",
    "video_task_vocabulary",
    "check_answer",
    "parse_trace",
]

VIDEO_FRAMES = (4, 6, 8)  # frames per clip; even, since the tower fuses 2 frames per group
VIDEO_FPS = 2.0  # frame rate the clip's metadata declares: group g spans [g, g + 1) seconds
FRAMES_PER_GROUP = 2  # Qwen3-VL's temporal_patch_size
VIDEO_KINDS = ("move", "order")
TIME_NAMES = ("start", "end")  # a step's time: the first or the last frame group

_BEHAVIOURS = ("static", "move", "appear", "disappear")


@dataclass
class VideoObject:
    """One object of a clip: what it is, and where it is in every frame group (None: not there)."""

    shape: str
    colour: str
    rgb: tuple[int, int, int]
    cells: list[tuple[int, int] | None]  # (row, col) per frame group
    masks: list[np.ndarray | None]  # bool (H, W) of its pixels per frame group

    def position(self, group: int) -> str:
        row, col = self.cells[group]  # type: ignore[misc]
        return position_name(row, col)

    def present(self, group: int) -> bool:
        return self.cells[group] is not None


@dataclass
class VideoExample(ThinkingTarget):
    """One clip + question + target thinking trace, with per-step evidence in space and time."""

    frames: list["PIL.Image.Image"]  # noqa: F821  (T frames, T in VIDEO_FRAMES)
    question: str
    thinking_steps: list[str]
    answer: str
    objects: list[VideoObject]
    seed: int
    kind: str
    step_objects: list[int] = field(default_factory=list)
    step_groups: list[tuple[int, ...]] = field(default_factory=list)
    step_cells: list[tuple[int, int]] = field(default_factory=list)
    step_evidence_masks: list[np.ndarray] = field(default_factory=list)  # bool (groups, H, W)
    step_evidence_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)

    @property
    def num_groups(self) -> int:
        return len(self.frames) // FRAMES_PER_GROUP

    @property
    def video_metadata(self) -> dict:
        """What the processor (and the streamer) take as ``video_metadata``: every frame, at ``VIDEO_FPS``."""
        n = len(self.frames)
        return {"fps": VIDEO_FPS, "total_num_frames": n, "frames_indices": list(range(n))}

    def frame_array(self) -> np.ndarray:
        """The clip as one (T, H, W, 3) uint8 array."""
        return np.stack([np.asarray(f) for f in self.frames])


# ----------------------------------------------------------------------------- tracks


def motion_name(start: tuple[int, int], end: tuple[int, int]) -> str:
    """'up', 'down and right', ... : the move from cell `start` to cell `end` (which differ)."""
    (r0, c0), (r1, c1) = start, end
    vertical = "down" if r1 > r0 else "up" if r1 < r0 else ""
    horizontal = "right" if c1 > c0 else "left" if c1 < c0 else ""
    if not (vertical or horizontal):
        raise ValueError("start and end are the same cell: no motion")
    return " and ".join(p for p in (vertical, horizontal) if p)


def _line(start: tuple[int, int], end: tuple[int, int], groups: int) -> list[tuple[int, int]]:
    """Cells from `start` to `end` in `groups` steps, along a straight line (rounded)."""
    if groups == 1:
        return [start]
    return [(int(round(start[0] + (end[0] - start[0]) * g / (groups - 1))),
             int(round(start[1] + (end[1] - start[1]) * g / (groups - 1)))) for g in range(groups)]


def _random_cell(rng: np.random.Generator) -> tuple[int, int]:
    c = int(rng.integers(GRID[0] * GRID[1]))
    return c // GRID[1], c % GRID[1]


def _track(rng: np.random.Generator, behaviour: str, groups: int) -> list[tuple[int, int] | None]:
    """A track of `behaviour` over `groups` frame groups."""
    start = _random_cell(rng)
    if behaviour == "static":
        return [start] * groups
    if behaviour == "move":
        while True:
            end = _random_cell(rng)
            if end != start:
                return list(_line(start, end, groups))
    k = int(rng.integers(1, groups))  # the first group without it ("disappear") / with it ("appear")
    if behaviour == "appear":
        return [None] * k + [start] * (groups - k)
    if behaviour == "disappear":
        return [start] * k + [None] * (groups - k)
    raise ValueError(f"unknown behaviour {behaviour!r}")  # pragma: no cover - guarded by _BEHAVIOURS


def _collide(tracks: list[list[tuple[int, int] | None]]) -> bool:
    for g in range(len(tracks[0])):
        cells = [t[g] for t in tracks if t[g] is not None]
        if len(set(cells)) != len(cells):
            return True
    return False


# ----------------------------------------------------------------------------- drawing


def _render(rng: np.random.Generator, shapes: list[str], colours: list[str],
            tracks: list[list[tuple[int, int] | None]], n_frames: int):
    """Paint every frame group; each object keeps its size, place inside its cell and colour."""
    from PIL import Image

    h, w = IMAGE_SIZE
    groups = n_frames // FRAMES_PER_GROUP
    grey = int(rng.integers(195, 236))
    background = _jitter_rgb(rng, (grey, grey, grey), 8)
    pictures = np.empty((groups, h, w, 3), dtype=np.uint8)
    pictures[:] = background
    objects = []
    for shape, colour, track in zip(shapes, colours, tracks):
        size = int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1))
        ty, tx = int(rng.integers(2)), int(rng.integers(2))
        slack = (TOKEN - size) / 2 - 2  # keep 2 px clear of the token border
        dx, dy = rng.uniform(-slack, slack), rng.uniform(-slack, slack)
        rgb = _jitter_rgb(rng, COLOURS[colour])
        masks: list[np.ndarray | None] = []
        for g, cell in enumerate(track):
            if cell is None:
                masks.append(None)
                continue
            row, col = cell
            mask = _draw_mask(shape, col * CELL + tx * TOKEN + TOKEN / 2 + dx, row * CELL + ty * TOKEN + TOKEN / 2 + dy,
                              size)
            pictures[g][mask] = rgb
            masks.append(mask)
        objects.append(VideoObject(shape, colour, rgb, list(track), masks))
    frames = [Image.fromarray(pictures[i // FRAMES_PER_GROUP]) for i in range(n_frames)]
    return frames, objects


# ----------------------------------------------------------------------------- examples


def _step(obj: VideoObject, group: int, time: str) -> str:
    return f"At the {time} the {obj.colour} object is at the {obj.position(group)}."


def make_video_example(seed: int, kind: str | None = None, n_frames: int | None = None) -> VideoExample:
    """The clip for `seed` (deterministic); `kind` and `n_frames` (4, 6 or 8) may be forced."""
    rng = np.random.default_rng(int(seed))
    kind_drawn = VIDEO_KINDS[int(rng.integers(len(VIDEO_KINDS)))]
    frames_drawn = VIDEO_FRAMES[int(rng.integers(len(VIDEO_FRAMES)))]
    kind = kind_drawn if kind is None else kind
    n_frames = frames_drawn if n_frames is None else int(n_frames)
    if kind not in VIDEO_KINDS:
        raise ValueError(f"kind must be one of {VIDEO_KINDS}, got {kind!r}")
    if n_frames not in VIDEO_FRAMES:
        raise ValueError(f"n_frames must be one of {VIDEO_FRAMES}, got {n_frames}")
    groups = n_frames // FRAMES_PER_GROUP

    n_distractors = int(rng.integers(1, 3)) if kind == "move" else int(rng.integers(0, 2))
    n_targets = 1 if kind == "move" else 2
    n = n_targets + n_distractors
    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(n)]
    while True:
        if kind == "move":
            targets = [_track(rng, "move", groups)]
        else:  # the first one is there from the start; the second appears later
            targets = [_track(rng, ("static", "move")[int(rng.integers(2))], groups), _track(rng, "appear", groups)]
        others = [_track(rng, _BEHAVIOURS[int(rng.integers(len(_BEHAVIOURS)))], groups) for _ in range(n_distractors)]
        tracks = targets + others
        if not _collide(tracks):
            break
    frames, objects = _render(rng, shapes, colours, tracks, n_frames)

    last = groups - 1
    if kind == "move":
        o = objects[0]
        question = f"Where did the {o.colour} object move?"
        step_plan = [(0, 0, "start"), (0, last, "end")]
        answer = motion_name(o.cells[0], o.cells[last])  # type: ignore[arg-type]
    else:
        first, later = objects[0], objects[1]
        named = (first, later) if bool(rng.integers(2)) else (later, first)
        question = f"Which appeared first, the {named[0].colour} object or the {named[1].colour} object?"
        step_plan = [(0, 0, "start"), (1, last, "end")]
        answer = first.colour
    steps = [_step(objects[i], g, time) for i, g, time in step_plan]
    evidence = []
    for i, g, _ in step_plan:
        mask = np.zeros((groups, *IMAGE_SIZE), dtype=bool)
        mask[g] = objects[i].masks[g]
        evidence.append(mask)
    return VideoExample(
        frames=frames,
        question=question,
        thinking_steps=steps,
        answer=answer,
        objects=objects,
        seed=int(seed),
        kind=kind,
        step_objects=[i for i, _, _ in step_plan],
        step_groups=[(g,) for _, g, _ in step_plan],
        step_cells=[objects[i].cells[g] for i, g, _ in step_plan],  # type: ignore[misc]
        step_evidence_masks=evidence,
        step_evidence_boxes=[_bbox(objects[i].masks[g]) for i, g, _ in step_plan],  # type: ignore[arg-type]
    )


def make_video_examples(n: int, seed: int = 0, *, start: int = 0) -> list[VideoExample]:
    """`n` clips, deterministic from `seed` (items ``start .. start+n-1`` of that stream)."""
    return [make_video_example(example_seed(seed, i)) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- chat + scoring


def video_prompt_messages(example: VideoExample) -> list[dict]:
    """Chat messages (one user turn: the video, then the question) for ``apply_chat_template``.

    Pass the frames as ``videos=[example.frames]`` with ``video_metadata=[example.video_metadata]`` and
    ``do_sample_frames=False`` to the processor, and the same to the streamer.
    """
    return [{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": example.question}]}]


_STEP_RE = re.compile(r"^At the (" + "|".join(TIME_NAMES) + r") the (" + "|".join(COLOURS) + r") object\b")


def video_step_object(example: VideoExample, step: str) -> tuple[int, int] | None:
    """(object index, frame group) a (generated) step is about, or None when it names no object at a time."""
    m = _STEP_RE.match(step.strip())
    if m is None:
        return None
    group = 0 if m.group(1) == "start" else example.num_groups - 1
    for i, obj in enumerate(example.objects):
        if obj.colour == m.group(2):
            return i, group
    return None


def video_evidence_for_step(example: VideoExample, step: str) -> np.ndarray | None:
    """Pixel mask (bool, groups x H x W) of the object a generated step names, in the group it names.

    None when the step names no object at a time; all False when the object is not there then.
    """
    found = video_step_object(example, step)
    if found is None:
        return None
    i, group = found
    mask = np.zeros((example.num_groups, *IMAGE_SIZE), dtype=bool)
    if example.objects[i].masks[group] is not None:
        mask[group] = example.objects[i].masks[group]
    return mask


def region_on_evidence(regions: Any, region: int, evidence: np.ndarray) -> bool:
    """Does global region ``region`` of ``regions`` (a ``PromptRegions``) cover an evidence pixel of a video?

    `evidence` is (groups, H, W) as in ``step_evidence_masks``: the region must hold the object's pixels
    in a frame group where the evidence is, so the right object at the wrong time does not count.
    """
    item, local = regions.region_owner(int(region))
    region_map = regions.maps[item]
    return any(bool((evidence[g] & (region_map.pixel_labels(g) == local)).any())
               for g in range(evidence.shape[0]) if evidence[g].any())


def video_task_vocabulary() -> list[str]:
    """Every text the video task can produce, in short sentences (tokenizer training corpus)."""
    positions = [position_name(r, c) for r in range(GRID[0]) for c in range(GRID[1])]
    texts = []
    for c in COLOURS:
        texts.append(f"Where did the {c} object move?")
        for time in TIME_NAMES:
            for p in positions:
                texts.append(f"At the {time} the {c} object is at the {p}.")
        for c2 in COLOURS:
            if c2 != c:
                texts.append(f"Which appeared first, the {c} object or the {c2} object?")
    cells = [(r, c) for r in range(GRID[0]) for c in range(GRID[1])]
    texts.extend(sorted({motion_name(a, b) for a in cells for b in cells if a != b}))
    texts.extend(COLOURS)
    # the timestamps Qwen3-VL's processor writes before each frame group (the mean time of its frames)
    groups = max(VIDEO_FRAMES) // FRAMES_PER_GROUP
    texts.extend(f"<{(g * FRAMES_PER_GROUP + 0.5) / VIDEO_FPS:.1f} seconds>" for g in range(groups))
    return texts
