"""A synthetic grounded-reasoning task whose visual evidence is known exactly.

Each example is a small RGB image (192 x 192 px, a 3 x 3 layout of 64 px
cells, i.e. 2 x 2 Qwen3-VL visual tokens per cell) holding three or four
objects. Every object has a different colour (from a palette of four) and a
shape (circle, square, triangle, cross; shapes may repeat), and sits inside one
32 px visual token of its cell. A question refers to objects by colour; the
target answer is a short thinking trace, one step per line, in which **every
step names exactly one object**, followed by the answer::

    <think>
    The red object is at the top left.
    The red object is a circle.
    </think>
    circle

Because each step names one object, the pixels that step *should* rely on are
known: ``example.step_evidence_masks[i]`` (bool, H x W) and
``example.step_evidence_boxes[i]`` (x0, y0, x1, y1; exclusive ends).

Question kinds (drawn uniformly, answers balanced within each kind):

``shape``  "What shape is the red object?"               locate it, read its shape; answer a shape.
``count``  "How many objects are in the top row?"         one step per object of that row (left to right);
                                                          answer one/two/three.
``left``   "Is the red object left of the blue object?"   locate each; answer yes/no.
``above``  "Is the red object above the blue object?"     locate each; answer yes/no.

No answer can be read off the text: shapes, positions and counts are drawn
independently of the wording, so a model must look at the image.

Everything is deterministic from a seed: ``make_example(seed)`` rebuilds the
same example (``example.seed``), and ``make_examples(n, seed)`` the same list.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = [
    "IMAGE_SIZE",
    "GRID",
    "SHAPES",
    "COLOURS",
    "KINDS",
    "COUNT_WORDS",
    "ToyObject",
    "ToyExample",
    "make_example",
    "make_examples",
    "position_name",
    "prompt_messages",
    "parse_trace",
    "check_answer",
    "step_object",
    "evidence_for_step",
    "task_vocabulary",
]

IMAGE_SIZE = (192, 192)  # (height, width) in pixels
GRID = (3, 3)  # rows x cols of the coarse layout
CELL = IMAGE_SIZE[0] // GRID[0]  # 64 px = 2 x 2 Qwen3-VL tokens (32 px each)
TOKEN = 32  # pixels per Qwen3-VL visual token side (patch 16 x merge 2)
OBJECT_SIZE = (22, 28)  # object extent in pixels (min, max): fits inside one token

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 40),
    "green": (40, 160, 60),
    "blue": (45, 90, 215),
    "black": (35, 35, 40),
}
KINDS = ("shape", "count", "left", "above")
COUNT_WORDS = ("zero", "one", "two", "three", "four")

_ROW_NAMES = ("top", "middle", "bottom")
_COL_NAMES = ("left", "center", "right")


def position_name(row: int, col: int) -> str:
    """Name of a layout cell: 'top left', 'top center', ..., 'center', ..., 'bottom right'."""
    if row == 1 and col == 1:
        return "center"
    return f"{_ROW_NAMES[row]} {_COL_NAMES[col]}"


@dataclass
class ToyObject:
    """One drawn object: what it is, where it is, and exactly which pixels it covers."""

    shape: str
    colour: str
    row: int
    col: int
    rgb: tuple[int, int, int]  # the exact (jittered) colour its pixels were painted with
    mask: np.ndarray  # bool (H, W): its pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1) tight box of mask, exclusive ends

    @property
    def position(self) -> str:
        return position_name(self.row, self.col)


class ThinkingTarget:
    """The target text of a toy example (image or video), from its ``thinking_steps`` and ``answer``."""

    thinking_steps: list[str]
    answer: str

    @property
    def thinking(self) -> str:
        """The thinking block's body: one step per line."""
        return "\n".join(self.thinking_steps)

    @property
    def completion(self) -> str:
        """What the model writes after the chat prompt (which already ends with ``<think>\\n``)."""
        return f"{self.thinking}\n</think>\n{self.answer}"

    @property
    def trace(self) -> str:
        """The full target assistant text: ``<think>\\n`` steps ``\\n</think>\\n`` answer."""
        return f"<think>\n{self.completion}"


@dataclass
class ToyExample(ThinkingTarget):
    """One image + question + target thinking trace, with per-step evidence.

    ``thinking_steps[i]`` names object ``objects[step_objects[i]]`` whose pixels are
    ``step_evidence_masks[i]`` (bool, H x W) inside ``step_evidence_boxes[i]``.
    """

    image: "PIL.Image.Image"  # noqa: F821
    question: str
    thinking_steps: list[str]
    answer: str
    step_evidence_masks: list[np.ndarray]
    objects: list[ToyObject]
    seed: int
    kind: str = ""
    step_objects: list[int] = field(default_factory=list)
    step_evidence_boxes: list[tuple[int, int, int, int]] = field(default_factory=list)



# ----------------------------------------------------------------------------- drawing


def _draw_mask(shape: str, cx: float, cy: float, size: int) -> np.ndarray:
    from PIL import Image, ImageDraw

    h, w = IMAGE_SIZE
    canvas = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(canvas)
    half = size / 2
    x0, y0, x1, y1 = cx - half, cy - half, cx + half, cy + half
    if shape == "circle":
        draw.ellipse([x0, y0, x1, y1], fill=255)
    elif shape == "square":
        s = 0.42 * size
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "triangle":
        draw.polygon([(cx, y0), (x1, y1), (x0, y1)], fill=255)
    elif shape == "cross":
        t = size / 6
        draw.rectangle([x0, cy - t, x1, cy + t], fill=255)
        draw.rectangle([cx - t, y0, cx + t, y1], fill=255)
    else:  # pragma: no cover - guarded by SHAPES
        raise ValueError(f"unknown shape {shape!r}")
    return np.asarray(canvas) > 0


def _bbox(mask: np.ndarray) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def _jitter_rgb(rng: np.random.Generator, rgb: tuple[int, int, int], amount: int = 18) -> tuple[int, int, int]:
    return tuple(int(np.clip(c + rng.integers(-amount, amount + 1), 0, 255)) for c in rgb)  # type: ignore[return-value]


def _render(rng: np.random.Generator, specs: list[tuple[str, str, int, int]]):
    """Paint objects (shape, colour, row, col) on a plain background; returns (image, objects)."""
    from PIL import Image

    h, w = IMAGE_SIZE
    grey = int(rng.integers(195, 236))
    background = _jitter_rgb(rng, (grey, grey, grey), 8)
    pixels = np.empty((h, w, 3), dtype=np.uint8)
    pixels[:] = background
    objects = [_paint_object(rng, pixels, shape, colour, COLOURS[colour], row, col) for shape, colour, row, col in specs]
    return Image.fromarray(pixels), objects


def _paint_object(rng: np.random.Generator, pixels: np.ndarray, shape: str, colour: str,
                  base_rgb: tuple[int, int, int], row: int, col: int) -> ToyObject:
    """Paint one small object into ``pixels`` (in place) and describe it.

    The object sits inside one visual token (32 px) of its cell's 2 x 2 tokens, so one LLM token
    sees the whole object; the cell still names its position. The hard task paints its objects
    with this too (same random draws, in the same order).
    """
    size = int(rng.integers(OBJECT_SIZE[0], OBJECT_SIZE[1] + 1))
    ty, tx = int(rng.integers(2)), int(rng.integers(2))
    slack = (TOKEN - size) / 2 - 2  # keep 2 px clear of the token border
    cx = col * CELL + tx * TOKEN + TOKEN / 2 + rng.uniform(-slack, slack)
    cy = row * CELL + ty * TOKEN + TOKEN / 2 + rng.uniform(-slack, slack)
    mask = _draw_mask(shape, cx, cy, size)
    rgb = _jitter_rgb(rng, base_rgb)
    pixels[mask] = rgb
    return ToyObject(shape, colour, row, col, rgb, mask, _bbox(mask))


# ----------------------------------------------------------------------------- examples


def draw_relation(rng: np.random.Generator, kind: str, cells: Sequence[tuple[int, int]]) -> tuple[int, int, bool, str]:
    """The pair of a left / above question: ``(a, b, yes, relation)``, where "a is <relation> b" is true iff ``yes``.

    Two draws from ``rng`` (the pair, then yes / no), in that order: the default and hard tasks share them, so
    their examples stay what their seeds made before.
    """
    n = len(cells)
    axis = 1 if kind == "left" else 0
    pairs = [(i, j) for i in range(n) for j in range(n) if i < j and cells[i][axis] != cells[j][axis]]
    i, j = pairs[int(rng.integers(len(pairs)))]
    if cells[i][axis] > cells[j][axis]:
        i, j = j, i  # now i is left of / above j
    yes = bool(rng.integers(2))
    a, b = (i, j) if yes else (j, i)
    return a, b, yes, "left of" if kind == "left" else "above"


def _reading_order(cells: Sequence[tuple[int, int]]) -> list[int]:
    return sorted(range(len(cells)), key=lambda i: cells[i])


def _cells(rng: np.random.Generator, n: int) -> list[tuple[int, int]]:
    return [(int(c) // GRID[1], int(c) % GRID[1]) for c in rng.permutation(GRID[0] * GRID[1])[:n]]


def make_example(seed: int, kind: str | None = None, n_objects: int | None = None) -> ToyExample:
    """The example for `seed` (deterministic).

    `kind` forces a question kind; `n_objects` (1..4) forces the number of objects
    (default: 3 or 4). Scenes with fewer objects are only used as a training
    curriculum; with one object only ``shape`` and ``count`` questions exist.
    """
    rng = np.random.default_rng(int(seed))
    kind_drawn = KINDS[int(rng.integers(len(KINDS)))]
    n = int(rng.integers(3, 5))  # 3 or 4 objects, all different colours
    if n_objects is not None:
        if not 1 <= n_objects <= len(COLOURS):
            raise ValueError(f"n_objects must be in 1..{len(COLOURS)}, got {n_objects}")
        n = int(n_objects)
    if kind is None:
        kind = kind_drawn if (n >= 2 or kind_drawn in ("shape", "count")) else ("shape", "count")[int(rng.integers(2))]
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if kind in ("left", "above") and n < 2:
        raise ValueError(f"{kind!r} questions need at least 2 objects")

    colours = [list(COLOURS)[i] for i in rng.permutation(len(COLOURS))[:n]]
    shapes = [SHAPES[int(rng.integers(len(SHAPES)))] for _ in range(n)]
    if kind == "count":
        row = int(rng.integers(GRID[0]))
        k = int(rng.integers(1, min(GRID[1], n) + 1))  # 1..3 objects in that row
        in_row = [(row, int(c)) for c in rng.permutation(GRID[1])[:k]]
        others = [(r, c) for r in range(GRID[0]) for c in range(GRID[1]) if r != row]
        cells = in_row + [others[int(i)] for i in rng.permutation(len(others))[:n - k]]
        cells = [cells[int(i)] for i in rng.permutation(n)]
    else:
        axis = {"left": 1, "above": 0}.get(kind)
        while True:
            cells = _cells(rng, n)
            if axis is None or len({c[axis] for c in cells}) > 1:
                break

    image, objects = _render(rng, [(s, c, r, cc) for s, c, (r, cc) in zip(shapes, colours, cells)])

    if kind == "shape":
        t = int(rng.integers(n))
        o = objects[t]
        question = f"What shape is the {o.colour} object?"
        steps = [f"The {o.colour} object is at the {o.position}.", f"The {o.colour} object is a {o.shape}."]
        step_objs = [t, t]
        answer = o.shape
    elif kind == "count":
        order = [i for i in _reading_order(cells) if cells[i][0] == row]
        question = f"How many objects are in the {_ROW_NAMES[row]} row?"
        steps = [f"The {objects[i].colour} object is at the {objects[i].position}." for i in order]
        step_objs = order
        answer = COUNT_WORDS[len(order)]
    else:
        a, b, yes, relation = draw_relation(rng, kind, cells)
        question = f"Is the {objects[a].colour} object {relation} the {objects[b].colour} object?"
        steps = [f"The {objects[a].colour} object is at the {objects[a].position}.",
                 f"The {objects[b].colour} object is at the {objects[b].position}."]
        step_objs = [a, b]
        answer = "yes" if yes else "no"

    return ToyExample(
        image=image,
        question=question,
        thinking_steps=steps,
        answer=answer,
        step_evidence_masks=[objects[i].mask for i in step_objs],
        objects=objects,
        seed=int(seed),
        kind=kind,
        step_objects=list(step_objs),
        step_evidence_boxes=[objects[i].bbox for i in step_objs],
    )


def example_seed(seed: int, index: int) -> int:
    """The per-example seed of item `index` of the stream ``make_examples(..., seed)``."""
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1)[0])


def make_examples(n: int, seed: int = 0, *, start: int = 0) -> list[ToyExample]:
    """`n` examples, deterministic from `seed` (items ``start .. start+n-1`` of that stream)."""
    return [make_example(example_seed(seed, i)) for i in range(start, start + n)]


# ----------------------------------------------------------------------------- chat + scoring


def prompt_messages(example: ToyExample) -> list[dict]:
    """Chat messages (one user turn: the image, then the question) for ``apply_chat_template``."""
    return [{"role": "user", "content": [{"type": "image", "image": example.image},
                                         {"type": "text", "text": example.question}]}]


_END_MARKERS = ("<|im_end|>", "<|endoftext|>")


def parse_trace(text: str) -> tuple[list[str], str | None]:
    """(steps, answer) from generated text; answer is None when ``</think>`` never came.

    Accepts text with or without the leading ``<think>`` (the chat prompt already
    holds it) and with trailing end-of-turn markers.
    """
    for marker in _END_MARKERS:
        text = text.split(marker)[0]
    text = text.lstrip()
    if text.startswith("<think>"):
        text = text[len("<think>"):]
    if "</think>" in text:
        thinking, answer = text.split("</think>", 1)
        answer = answer.strip()
    else:
        thinking, answer = text, None
    steps = [line.strip() for line in thinking.split("\n") if line.strip()]
    return steps, answer


def _normalise_answer(answer: str | None) -> str:
    return (answer or "").strip().rstrip(".").strip().lower()


def check_answer(example: ToyExample, generated_text: str) -> tuple[bool, float]:
    """(answer_correct, steps_correct_fraction) of a generated trace.

    A step is correct when it equals the target step at the same index; the
    fraction divides by the longer of the two step lists, so missing and extra
    steps both count against it.
    """
    steps, answer = parse_trace(generated_text)
    answer_correct = answer is not None and _normalise_answer(answer) == _normalise_answer(example.answer)
    target = example.thinking_steps
    matches = sum(1 for a, b in zip(steps, target) if a == b)
    denom = max(len(steps), len(target))
    return bool(answer_correct), (matches / denom if denom else 1.0)


_COLOUR_RE = re.compile(r"\b(" + "|".join(COLOURS) + r")\b")


def step_object(example: ToyExample, step: str) -> int | None:
    """Index into ``example.objects`` of the object a (generated) step names, or None.

    Steps name one object by its colour, and colours are unique within an image.
    """
    names = _COLOUR_RE.findall(step)
    if len(set(names)) != 1:
        return None
    for i, obj in enumerate(example.objects):
        if obj.colour == names[0]:
            return i
    return None


def evidence_for_step(example: ToyExample, step: str) -> np.ndarray | None:
    """Pixel mask (bool H x W) of the object a generated step names, or None."""
    i = step_object(example, step)
    return None if i is None else example.objects[i].mask


def region_on_evidence(regions: Any, region: int, evidence: np.ndarray) -> bool:
    """Does global region ``region`` of ``regions`` (a ``PromptRegions``) cover any evidence pixel?

    The toy's pointing test: a step is attributed right when its top region touches the object it names.
    """
    image, local = regions.region_owner(int(region))
    return bool((evidence & (regions.maps[image].pixel_labels() == local)).any())


def task_vocabulary() -> list[str]:
    """Every text the task can produce, in short sentences (tokenizer training corpus)."""
    positions = [position_name(r, c) for r in range(GRID[0]) for c in range(GRID[1])]
    texts = []
    for c in COLOURS:
        texts.append(f"What shape is the {c} object?")
        for p in positions:
            texts.append(f"The {c} object is at the {p}.")
        for s in SHAPES:
            texts.append(f"The {c} object is a {s}.")
        for c2 in COLOURS:
            if c2 != c:
                texts.append(f"Is the {c} object left of the {c2} object?")
                texts.append(f"Is the {c} object above the {c2} object?")
    for r in _ROW_NAMES:
        texts.append(f"How many objects are in the {r} row?")
    texts.extend(["yes", "no", *SHAPES, *COUNT_WORDS])
    return texts
