"""Datasets a collection is built from, and rebuilt from: the toy task or a JSON-lines file.

A :class:`DatasetSpec` is what ``hf-vattr collect`` writes to ``<collection>/dataset.json``, so
``eval`` can rebuild the same prompts for the model and label traces right or wrong. It lives
apart from the CLI so that scripts (the toy faithfulness report) build the very same examples
without importing the command line.

The JSON-lines format is :data:`hf_vattr.collection.PROMPTS_FORMAT` (``hf-vattr collect --help``).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from .errors import AttributionError

__all__ = ["DATASET_FILE", "DatasetSpec", "correctness_labels", "read_dataset_spec"]

DATASET_FILE = "dataset.json"


class DatasetError(AttributionError, ValueError):
    """A dataset description (``dataset.json``) cannot be used."""


class DatasetSpec:
    """How to (re)build the examples of a collection: ``(example_id, images, prompt)`` triples."""

    def __init__(self, kind: str, **params: Any) -> None:
        if kind not in ("toy", "jsonl"):
            raise DatasetError(f"unknown dataset kind {kind!r}; dataset.json must say 'toy' or 'jsonl'.")
        self.kind = kind
        self.params = params

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, data: dict) -> DatasetSpec:
        data = dict(data)
        return cls(data.pop("kind"), **data)

    def items(self, limit: int | None = None) -> _Items:
        """A lazy, sized iterable of ``(example_id, images, prompt)``.

        Images are made (toy) or named by path (JSONL) only when iterated, so under
        ``accelerate launch`` each process builds / opens only its own shard.
        """
        return _Items(self, limit)

    def get(self, example_id: int) -> tuple[list[Any], Any]:
        """``(images, prompt)`` of one example, images opened (for rebuilding model inputs)."""
        from .collection import _load_image

        if self.kind == "toy":
            ex = self._toy(int(example_id))
            return [ex.image], self._toy_prompt(ex)
        rows = {eid: (images, prompt) for eid, images, prompt, _ in self._jsonl_rows()}
        if int(example_id) not in rows:
            raise KeyError(example_id)
        images, prompt = rows[int(example_id)]
        return [_load_image(im) for im in images], prompt

    def answers(self) -> dict[int, Any]:
        """Example id -> the toy example (for ``check_answer``) or the JSONL ``answer``."""
        if self.kind == "toy":
            return {i: self._toy(i) for i in range(int(self.params["n"]))}
        return {eid: ans for eid, _, _, ans in self._jsonl_rows() if ans is not None}

    def ids(self) -> list[int]:
        """Every example id of the dataset (toy: ``0 .. n-1``; JSONL: the rows' ids), in order."""
        if self.kind == "toy":
            return list(range(int(self.params["n"])))
        return [eid for eid, _, _, _ in self._jsonl_rows()]

    def __len__(self) -> int:
        return int(self.params["n"]) if self.kind == "toy" else len(self._jsonl_rows())

    def _toy(self, index: int) -> Any:
        """Toy example ``index``; ``task="hard"`` in the params picks the hard task family."""
        from .toy import example_seed, make_example

        seed = example_seed(int(self.params.get("seed", 0)), index)
        task = self.params.get("task", "default")
        if task == "hard":
            from .toy.hard_task import make_hard_example

            return make_hard_example(seed)
        if task != "default":
            raise ValueError(f"unknown toy task {task!r}: use 'default' or 'hard'.")
        return make_example(seed)

    @staticmethod
    def _toy_prompt(ex: Any) -> Any:
        from .toy import prompt_messages

        return prompt_messages(ex)

    def _iter(self) -> Iterator[tuple[int, list[Any], Any]]:
        if self.kind == "toy":
            for i in range(int(self.params["n"])):
                ex = self._toy(i)
                yield i, [ex.image], self._toy_prompt(ex)
        else:
            for eid, images, prompt, _ in self._jsonl_rows():
                yield eid, images, prompt

    def _jsonl_rows(self) -> list[tuple[int, list[str], Any, Any]]:
        """Parsed JSONL rows ``(id, image paths, prompt, answer)``; images are not opened here."""
        from .collection import read_prompts

        if "_rows" not in self.__dict__:  # read_prompts' errors name the file, line and field
            rows = read_prompts(self.params["path"], self.params.get("images_dir"))
            self.__dict__["_rows"] = [tuple(row) for row in rows]
        return self.__dict__["_rows"]


class _Items:
    """Sized lazy iterable over a dataset's examples (what :func:`hf_vattr.collection.collect` takes)."""

    def __init__(self, spec: DatasetSpec, limit: int | None) -> None:
        self.spec, self.limit = spec, limit

    def __len__(self) -> int:
        n = len(self.spec)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self) -> Iterator[tuple[int, list[Any], Any]]:
        for i, item in enumerate(self.spec._iter()):
            if self.limit is not None and i >= self.limit:
                return
            yield item


def read_dataset_spec(collection: str | os.PathLike) -> DatasetSpec | None:
    """The spec ``collect`` wrote into a collection folder, or ``None`` when it has none."""
    p = Path(collection) / DATASET_FILE
    if not p.exists():
        return None
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DatasetError(f"{p} is not valid JSON ({e}); it is truncated or damaged. Delete it to use the "
                           "collection without the dataset (stored ground truth only).") from e
    if not isinstance(data, dict) or "kind" not in data:
        raise DatasetError(f"{p} lacks the field 'kind'; it was not written by `hf-vattr collect`.")
    return DatasetSpec.from_dict(data)


def correctness_labels(dataset: DatasetSpec | None, records: Sequence[Any]) -> list[bool] | None:
    """Was each record's trace right? ``None`` when any label is unknown (trajectory analysis needs all)."""
    if dataset is None:
        return None
    answers = dataset.answers()
    labels = []
    for r in records:
        ans = answers.get(r.example_id)
        if ans is None:
            return None
        if dataset.kind == "toy":
            from .toy import check_answer

            labels.append(bool(check_answer(ans, r.text)[0]))
        else:
            labels.append(str(ans).strip().lower() in r.text.strip().lower().split("</think>")[-1])
    return labels
