"""The hard toy task: more objects, salient distractors, and steps whose evidence is several objects.

Same canvas as :mod:`hf_vattr.toy.task` (192 x 192 px, a 3 x 3 layout of 64 px cells, 2 x 2
Qwen3-VL visual tokens per cell), but harder for an attribution method, in three ways:

* **more objects**: 5 or 6 small objects, each of a different colour from a palette of six
  (red, green, blue, black, purple, orange), each inside one 32 px visual token of its cell;
* **distractors**: 1 or 2 large bright yellow shapes (44-56 px, filling most of their own cell,
  i.e. spread over 4 visual tokens). They are the most salient things in the image, and no
  question or step is ever about them: they are never evidence and never counted;
* **multi-object steps**: counting and comparison steps whose evidence is every object they
  cover, e.g. ``The top row has the red and blue objects.`` / ``The top row has two objects.``
  (both: every small object of the row) and ``The red object is left of the blue object.``
  (both objects).

Question kinds (drawn uniformly, answers balanced within each kind)::

    shape  "What shape is the red object?"                    locate it; read its shape           -> a shape
    count  "How many small objects are in the top row?"       list the row's objects; count them   -> one/two/three
           "How many small objects are in the left column?"   (rows and columns, 50/50)
    left   "Is the red object left of the blue object?"       locate each; compare                 -> yes/no
    above  "Is the red object above the blue object?"         locate each; compare                 -> yes/no

``example.step_objects[i]`` is the tuple of object indices step ``i`` covers, and
``example.step_evidence_masks[i]`` their union mask (bool H x W). For a *generated* step,
:func:`evidence_for_step` rebuilds that union from the text, so a pointing test can ask whether
the top region lies on any of the step's objects (``region_on_evidence`` takes the mask).

Everything is deterministic from a seed, and the default task is untouched: this module has its
own ``make_example`` / ``make_examples``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from .task import (_COL_NAMES, _ROW_NAMES, CELL, GRID, IMAGE_SIZE, SHAPES, ToyExample, ToyObject, _bbox, _draw_mask,
                   _jitter_rgb, _paint_object, check_answer, draw_relation, example_seed, parse_trace,
                   position_name, prompt_messages, region_on_evidence)

__all__ = [
    "HARD_COLOURS",
    "HARD_KINDS",
    "DISTRACTOR_COLOUR",
    "LINE_COUNT_WORDS",
    "HardExample",
    "make_hard_example",
    "make_hard_examples",
    "step_objects",
    "evidence_for_step",
    "hard_task_vocabulary",
    "check_answer",
    "parse_trace",
    "prompt_messages",
    "region_on_evidence",
    "example_seed",
]

HARD_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 160, 60),
    "blue": (45, 90, 215),
    "black": (35, 35, 40),
    "purple": (135, 50, 175),
    "orange": (240, 135, 25),
}
DISTRACTOR_COLOUR = (245, 210, 30)  # bright yellow: never a question's colour
DISTRACTOR_SIZE = (44, 56)
HARD_KINDS = ("shape", "count", "left", "above")
LINE_COUNT_WORDS = ("zero", "one", "two", "three")


@dataclass
class HardExample(ToyExample):
    """One hard-task image + question + target trace, with per-step (multi-object) evidence.

    A :class:`~hf_vattr.toy.task.ToyExample` (same fields and text properties) except that ``step_objects[i]``
    is a *tuple* of object indices, and ``distractors`` holds the large shapes that are never evidence.
    """

    step_objects: list[tuple[int, ...]] = field(default_factory=list)
    distractors: list[ToyObject] = field(default_factory=list)


def _line_name(axis: int, index: int) -> str:
    """'top row' ... 'bottom row' (axis 0) or 'left column' ... 'right column' (axis 1)."""
    return f"{_ROW_NAMES[index]} row" if axis == 0 else f"{_COL_NAMES[index]} column"


def _list_colours(colours: list[str]) -> str:
    if len(colours) == 1:
        return f"the {colours[0]} object"
    return "the " + ", ".join(colours[:-1]) + f" and {colours[-1]} objects"


def _render(rng: np.random.Generator, specs: list[tuple[str, str, int, int]], distractor_specs: list[tuple[str, int, int]]):
    """Paint small objects (shape, colour, row, col) and large distractors (shape, row, col)."""
    from PIL import Image

    h, w = IMAGE_SIZE
    grey = int(rng.integers(195, 236))
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = _jitter_rgb(rng, (grey, grey, grey), 8)
    distractors: list[ToyObject] = []
    for shape, row, col in distractor_specs:
        size = int(rng.integers(DISTRACTOR_SIZE[0], DISTRACTOR_SIZE[1] + 1))
        slack = (CELL - size) / 2 - 2
        cx = col * CELL + CELL / 2 + rng.uniform(-slack, slack)
        cy = row * CELL + CELL / 2 + rng.uniform(-slack, slack)
        mask = _draw_mask(shape, cx, cy, size)
        rgb = _jitter_rgb(rng, DISTRACTOR_COLOUR, 10)
        pixels[mask] = rgb
        distractors.append(ToyObject(shape, "yellow", row, col, rgb, mask, _bbox(mask)))
    objects = [_paint_object(rng, pixels, shape, colour, HARD_COLOURS[colour], row, col)
               for shape, colour, row, col in specs]
    return Image.fromarray(pixels), objects, distractors


def _union(objects: list[ToyObject], idx: tuple[int, ...]) -> np.ndarray:
    mask = np.zeros(IMAGE_SIZE, dtype=bool)
    for i in idx:
        mask |= objects[i].mask
    return mask


def make_hard_example(seed: int, kind: str | None = None, n_objects: int | None = None,
                      n_distractors: int | None = None) -> HardExample:
    """The hard-task example for `seed` (deterministic).

    `kind` forces a question kind; `n_objects` (1..6; default 5 or 6) and `n_distractors`
    (0..2; default 1 or 2) force the scene size (fewer objects are a training curriculum).
    """
    rng = np.random.default_rng([int(seed), 2])  # its own stream: never the default task's scenes
    kind, n, d = _scene_size(rng, kind, n_objects, n_distractors)
    colours = [list(HARD_COLOURS)[i] for i in rng.permutation(len(HARD_COLOURS))[:n]]
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(n)]
    cells, line = _object_cells(rng, kind, n)
    free = [c for c in _ALL_CELLS if c not in cells]
    d_cells = [free[int(i)] for i in rng.permutation(len(free))[:d]]
    d_shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(d)]

    image, objects, distractors = _render(rng, [(s, c, r, cc) for s, c, (r, cc) in zip(shapes, colours, cells)],
                                          [(s, r, c) for s, (r, c) in zip(d_shapes, d_cells)])
    if kind == "shape":
        question, steps, step_objs, answer = _shape_question(rng, objects)
    elif kind == "count":
        question, steps, step_objs, answer = _count_question(objects, cells, *line)
    else:
        question, steps, step_objs, answer = _relation_question(rng, kind, objects, cells)

    masks = [_union(objects, idx) for idx in step_objs]
    return HardExample(
        image=image, question=question, thinking_steps=steps, answer=answer, step_evidence_masks=masks,
        objects=objects, seed=int(seed), kind=kind, step_objects=[tuple(s) for s in step_objs],
        step_evidence_boxes=[_bbox(m) for m in masks], distractors=distractors,
    )


_ALL_CELLS = [(r, c) for r in range(GRID[0]) for c in range(GRID[1])]


def _scene_size(rng: np.random.Generator, kind: str | None, n_objects: int | None,
                n_distractors: int | None) -> tuple[str, int, int]:
    """The question kind and the numbers of objects and distractors: drawn, or forced (and checked)."""
    kind_drawn = HARD_KINDS[int(rng.integers(len(HARD_KINDS)))]
    n = int(rng.integers(5, 7))
    d = int(rng.integers(1, 3))
    if n_objects is not None:
        if not 1 <= n_objects <= len(HARD_COLOURS):
            raise ValueError(f"n_objects must be in 1..{len(HARD_COLOURS)}, got {n_objects}")
        n = int(n_objects)
    if n_distractors is not None:
        if not 0 <= n_distractors <= 2:
            raise ValueError(f"n_distractors must be in 0..2, got {n_distractors}")
        d = int(n_distractors)
    if kind is None:
        kind = kind_drawn if (n >= 2 or kind_drawn in ("shape", "count")) else ("shape", "count")[int(rng.integers(2))]
    if kind not in HARD_KINDS:
        raise ValueError(f"kind must be one of {HARD_KINDS}, got {kind!r}")
    if kind in ("left", "above") and n < 2:
        raise ValueError(f"{kind!r} questions need at least 2 objects")
    return kind, n, d


def _object_cells(rng: np.random.Generator, kind: str, n: int) -> tuple[list[tuple[int, int]], tuple[int, int] | None]:
    """The cells of the `n` small objects, and the counted line ``(axis, index)`` of a count question.

    A count question puts 1..3 objects on its line; a left/above question needs two objects that differ
    along its axis. Other kinds have no line (None).
    """
    if kind == "count":
        line_axis = int(rng.integers(2))  # 0: a row, 1: a column
        line = int(rng.integers(3))
        k = int(rng.integers(1, min(3, n) + 1))
        on_line = [c for c in _ALL_CELLS if c[line_axis] == line]
        off_line = [c for c in _ALL_CELLS if c[line_axis] != line]
        chosen = [on_line[int(i)] for i in rng.permutation(3)[:k]]
        chosen += [off_line[int(i)] for i in rng.permutation(len(off_line))[:n - k]]
        return [chosen[int(i)] for i in rng.permutation(n)], (line_axis, line)
    axis = {"left": 1, "above": 0}.get(kind)
    while True:
        cells = [_ALL_CELLS[int(i)] for i in rng.permutation(len(_ALL_CELLS))[:n]]
        if axis is None or len({c[axis] for c in cells}) > 1:
            return cells, None


def _shape_question(rng: np.random.Generator, objects: list[ToyObject]) -> tuple[str, list[str], list[tuple], str]:
    """A shape question ("What shape is the red object?"): locate the object, read its shape."""
    t = int(rng.integers(len(objects)))
    o = objects[t]
    steps = [f"The {o.colour} object is at the {o.position}.", f"The {o.colour} object is a {o.shape}."]
    return f"What shape is the {o.colour} object?", steps, [(t,), (t,)], o.shape


def _count_question(objects: list[ToyObject], cells: list[tuple[int, int]], line_axis: int,
                    line: int) -> tuple[str, list[str], list[tuple], str]:
    """A count question ("How many small objects are in the top row?"): list the line's objects, count them."""
    other = 1 - line_axis  # order along the line: left to right in a row, top to bottom in a column
    members = tuple(sorted((i for i in range(len(objects)) if cells[i][line_axis] == line),
                           key=lambda i: cells[i][other]))
    name = _line_name(line_axis, line)
    steps = [f"The {name} has {_list_colours([objects[i].colour for i in members])}.",
             f"The {name} has {LINE_COUNT_WORDS[len(members)]} object{'s' if len(members) > 1 else ''}."]
    return (f"How many small objects are in the {name}?", steps, [members, members],
            LINE_COUNT_WORDS[len(members)])


def _relation_question(rng: np.random.Generator, kind: str, objects: list[ToyObject],
                       cells: list[tuple[int, int]]) -> tuple[str, list[str], list[tuple], str]:
    """A left / above question ("Is the red object left of the blue object?"): locate each, compare."""
    a, b, yes, relation = draw_relation(rng, kind, cells)
    ca, cb = objects[a].colour, objects[b].colour
    steps = [f"The {ca} object is at the {objects[a].position}.",
             f"The {cb} object is at the {objects[b].position}.",
             f"The {ca} object is {'' if yes else 'not '}{relation} the {cb} object."]
    return f"Is the {ca} object {relation} the {cb} object?", steps, [(a,), (b,), (a, b)], "yes" if yes else "no"


def make_hard_examples(n: int, seed: int = 0, *, start: int = 0) -> list[HardExample]:
    """`n` hard examples, deterministic from `seed` (items ``start .. start+n-1`` of that stream)."""
    return [make_hard_example(example_seed(seed, i)) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- evidence of generated steps

_COLOUR_RE = re.compile(r"\b(" + "|".join(HARD_COLOURS) + r")\b")
_LINE_RE = re.compile(r"\bThe (top|middle|bottom) row\b|\bThe (left|center|right) column\b")


def step_objects(example: HardExample, step: str) -> tuple[int, ...] | None:
    """Indices into ``example.objects`` that a (generated) step is about, or None.

    A step that names colours covers those objects (a locate, shape, listing or comparison
    step); a step that names a row or column and no colour (a count step) covers every
    small object of that line. Distractors are never covered. Colours absent from the image
    are ignored; None when nothing in the image is covered.
    """
    names = _COLOUR_RE.findall(step)
    if names:
        idx = tuple(i for i, o in enumerate(example.objects) if o.colour in set(names))
    else:
        m = _LINE_RE.search(step)
        if m is None:
            return None
        if m.group(1):
            row = _ROW_NAMES.index(m.group(1))
            idx = tuple(i for i, o in enumerate(example.objects) if o.row == row)
        else:
            col = _COL_NAMES.index(m.group(2))
            idx = tuple(i for i, o in enumerate(example.objects) if o.col == col)
    return idx or None


def evidence_for_step(example: HardExample, step: str) -> np.ndarray | None:
    """Union pixel mask (bool H x W) of every object a generated step covers, or None."""
    idx = step_objects(example, step)
    return None if idx is None else _union(example.objects, idx)


def hard_task_vocabulary() -> list[str]:
    """Every text the hard task can produce, in short sentences (tokenizer training corpus)."""
    positions = [position_name(r, c) for r in range(GRID[0]) for c in range(GRID[1])]
    lines = [_line_name(0, i) for i in range(3)] + [_line_name(1, i) for i in range(3)]
    colours = list(HARD_COLOURS)
    texts = []
    for c in colours:
        texts.append(f"What shape is the {c} object?")
        texts += [f"The {c} object is at the {p}." for p in positions]
        texts += [f"The {c} object is a {s}." for s in SHAPES]
        for c2 in colours:
            if c2 != c:
                for rel in ("left of", "above"):
                    texts.append(f"Is the {c} object {rel} the {c2} object?")
                    texts.append(f"The {c} object is {rel} the {c2} object.")
                    texts.append(f"The {c} object is not {rel} the {c2} object.")
    for line in lines:
        texts.append(f"How many small objects are in the {line}?")
        for k in range(1, 4):
            texts.append(f"The {line} has {LINE_COUNT_WORDS[k]} object{'s' if k > 1 else ''}.")
        for k in range(1, 4):
            texts.append(f"The {line} has {_list_colours(colours[:k])}.")
            texts.append(f"The {line} has {_list_colours(colours[-k:])}.")
    texts.extend(["yes", "no", *SHAPES, *LINE_COUNT_WORDS])
    return texts
