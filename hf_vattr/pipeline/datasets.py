"""Datasets a collection is built from, and rebuilt from: the toy task, a JSON-lines file, or a ``datasets`` dataset.

A :class:`DatasetSpec` is what ``hf-vattr collect`` writes to ``<collection>/dataset.json``, so
``eval`` can rebuild the same prompts for the model and label traces right or wrong. It lives
apart from the CLI so that scripts (the toy faithfulness report) build the very same examples
without importing the command line.

The JSON-lines format is :data:`hf_vattr.pipeline.collection.PROMPTS_FORMAT` (``hf-vattr collect --help``).
Kind ``"datasets"`` reads anything ``datasets.load_dataset`` reads (a Hub id, or a local folder of
parquet / json / imagefolder files; streamed) or a folder written by ``save_to_disk`` (memory-mapped),
one split, with an image column and / or a video column, and a question column (:func:`open_hf_dataset`
checks them). A video cell is a video file (a path, or a ``datasets.Video`` value read undecoded) or a list
of frames (images as an image cell holds them); it becomes a :class:`~hf_vattr.pipeline.collection.Video`
at the spec's ``fps``, placed before the row's images in the prompt.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..errors import AttributionError

__all__ = ["DATASET_FILE", "DatasetSpec", "DatasetError", "correctness_labels", "read_dataset_spec", "hf_dataset_spec"]

DATASET_FILE = "dataset.json"


KINDS = ("toy", "jsonl", "datasets")


class DatasetError(AttributionError, ValueError):
    """A dataset description (``dataset.json``), or the dataset it names, cannot be used."""


class DatasetSpec:
    """How to (re)build the examples of a collection: ``(example_id, images, prompt)`` triples."""

    def __init__(self, kind: str, **params: Any) -> None:
        if kind not in KINDS:
            raise DatasetError(f"unknown dataset kind {kind!r}; dataset.json must say 'toy', 'jsonl' or 'datasets'.")
        self.kind = kind
        self.params = params

    def to_dict(self) -> dict:
        return {"kind": self.kind, **self.params}

    @classmethod
    def from_dict(cls, data: dict) -> DatasetSpec:
        data = dict(data)
        return cls(data.pop("kind"), **data)

    def items(self, limit: int | None = None, shard: tuple[int, int] | None = None) -> _Items:
        """A lazy iterable of ``(example_id, images, prompt)``; sized unless a streamed dataset hides its length.

        Images are made (toy) or named by path (JSONL) only when iterated, so under
        ``accelerate launch`` each process builds / opens only its own shard. ``shard=(index, count)``
        (what :func:`hf_vattr.pipeline.collection.collect` does with item ``i``: process ``i % count``) makes a
        ``datasets`` dataset decode only the images of its own rows; the others come as
        ``(example_id, [], None)``, which ``collect`` skips without looking.
        """
        if self.kind == "datasets" and self._hf().length is None:
            return _StreamItems(self, limit, shard)
        return _Items(self, limit, shard)

    def get(self, example_id: int) -> tuple[list[Any], Any]:
        """``(images, prompt)`` of one example, images opened and videos decoded (for rebuilding model inputs)."""
        from .collection import _load_visual

        if self.kind == "toy":
            ex = self._toy(int(example_id))
            return [ex.image], self._toy_prompt(ex)
        if self.kind == "datasets":
            images, prompt = self._hf().get(int(example_id))
            return [_load_visual(im) for im in images], prompt
        rows = {eid: (images, prompt) for eid, images, prompt, _ in self._jsonl_rows()}
        if int(example_id) not in rows:
            raise KeyError(example_id)
        images, prompt = rows[int(example_id)]
        return [_load_visual(im) for im in images], prompt

    def answers(self) -> dict[int, Any]:
        """Example id -> the toy example (for ``check_answer``) or the JSONL ``answer``."""
        if self.kind == "toy":
            return {i: self._toy(i) for i in range(int(self.params["n"]))}
        if self.kind == "datasets":
            return {}  # no answer column: traces are not labelled
        return {eid: ans for eid, _, _, ans in self._jsonl_rows() if ans is not None}

    def ids(self) -> list[int]:
        """Every example id of the dataset (toy: ``0 .. n-1``; JSONL: the rows' ids), in order."""
        if self.kind == "toy":
            return list(range(int(self.params["n"])))
        if self.kind == "datasets":
            return self._hf().ids()
        return [eid for eid, _, _, _ in self._jsonl_rows()]

    def __len__(self) -> int:
        if self.kind == "datasets":
            n = self._hf().length
            return len(self._hf().ids()) if n is None else n  # a streamed split without a length: one pass
        return int(self.params["n"]) if self.kind == "toy" else len(self._jsonl_rows())

    def _hf(self) -> Any:
        """The opened ``datasets`` split (:class:`_HFSource`), opened and checked once."""
        if "_source" not in self.__dict__:
            self.__dict__["_source"] = _HFSource(self.params)
        return self.__dict__["_source"]

    def _toy(self, index: int) -> Any:
        """Toy example ``index``; ``task="hard"`` in the params picks the hard task family."""
        from ..toy import example_seed, make_example

        seed = example_seed(int(self.params.get("seed", 0)), index)
        task = self.params.get("task", "default")
        if task == "hard":
            from ..toy.hard_task import make_hard_example

            return make_hard_example(seed)
        if task != "default":
            raise ValueError(f"unknown toy task {task!r}: use 'default' or 'hard'.")
        return make_example(seed)

    @staticmethod
    def _toy_prompt(ex: Any) -> Any:
        from ..toy import prompt_messages

        return prompt_messages(ex)

    def _iter(self, shard: tuple[int, int] | None = None) -> Iterator[tuple[int, list[Any], Any]]:
        if self.kind == "toy":
            for i in range(int(self.params["n"])):
                ex = self._toy(i)
                yield i, [ex.image], self._toy_prompt(ex)
        elif self.kind == "datasets":
            yield from self._hf().rows(shard)
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


class _StreamItems:
    """Lazy iterable over a dataset's examples; not sized (a streamed split whose metadata gives no length)."""

    def __init__(self, spec: DatasetSpec, limit: int | None, shard: tuple[int, int] | None = None) -> None:
        self.spec, self.limit, self.shard = spec, limit, shard

    def __iter__(self) -> Iterator[tuple[int, list[Any], Any]]:
        for i, item in enumerate(self.spec._iter(self.shard)):
            if self.limit is not None and i >= self.limit:
                return
            yield item


class _Items(_StreamItems):
    """Sized lazy iterable over a dataset's examples (what :func:`hf_vattr.pipeline.collection.collect` takes)."""

    def __len__(self) -> int:
        n = len(self.spec)
        return n if self.limit is None else min(n, self.limit)


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
            from ..toy import check_answer

            labels.append(bool(check_answer(ans, r.text)[0]))
        else:
            labels.append(str(ans).strip().lower() in r.text.strip().lower().split("</think>")[-1])
    return labels


# ----------------------------------------------------------------------------- `datasets` datasets


def hf_dataset_spec(dataset: str, split: str, image_column: str | None, question_column: str, *,
                    config: str | None = None, id_column: str | None = None,
                    system_prompt: str | None = None, video_column: str | None = None,
                    fps: float | None = None) -> DatasetSpec:
    """A :class:`DatasetSpec` of kind ``"datasets"``, opened and checked now (a :class:`DatasetError` otherwise).

    ``dataset`` is a Hub id or a local folder (of parquet / json / imagefolder files, or written by
    ``save_to_disk``); a local path is recorded absolute. The spec's params include ``content``, a
    fingerprint of what the split holds (a ``save_to_disk`` folder: its ``datasets`` fingerprint; other
    local files: the SHA-256 of their bytes; a Hub dataset: its builder hash, which follows the repo's
    commit), so :func:`hf_vattr.pipeline.collection.dataset_fingerprint` tells datasets apart by content.
    """
    local = Path(dataset).expanduser()
    name = str(local.resolve()) if local.exists() else dataset
    params = {"dataset": name, "config": config, "split": split, "image_column": image_column,
              "question_column": question_column, "id_column": id_column, "system_prompt": system_prompt}
    if video_column is not None:  # recorded only for video datasets: image datasets keep their fingerprints
        params.update(video_column=video_column, fps=fps)
    spec = DatasetSpec("datasets", **params)
    spec.params["content"] = spec._hf().content_fingerprint()
    return spec


def _first_line(err: BaseException) -> str:
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)


def _is_image_feature(feature: Any) -> bool:
    import datasets as hfd

    if isinstance(feature, hfd.Image):
        return True
    inner = getattr(feature, "feature", None) if isinstance(feature, (hfd.List, hfd.Sequence)) else \
        (feature[0] if isinstance(feature, list) and len(feature) == 1 else None)
    return isinstance(inner, hfd.Image)


def _undecoded(feature: Any) -> Any:
    """The same image feature with decoding off (rows then carry ``{"bytes", "path"}``, decoded on demand)."""
    import datasets as hfd

    if isinstance(feature, hfd.Image):
        return hfd.Image(decode=False)
    if isinstance(feature, list):
        return [hfd.Image(decode=False)]
    return hfd.List(hfd.Image(decode=False))


class _HFSource:
    """One split of a ``datasets`` dataset, checked on opening: split, columns, a first row with images."""

    def __init__(self, params: dict) -> None:
        import datasets as hfd

        self.params = params
        self.name = str(params["dataset"])
        self.split = str(params["split"])
        self.config = params.get("config")
        self.image_column, self.question_column = params["image_column"], params["question_column"]
        self.video_column, self.fps = params.get("video_column"), params.get("fps")
        if self.image_column is None and self.video_column is None:
            raise DatasetError("a `datasets` dataset needs an image column or a video column (--image-column, "
                               "--video-column).")
        self.id_column = params.get("id_column")
        self.system_prompt = params.get("system_prompt")
        path = Path(self.name)
        self.local = path.exists()
        self.base = path if path.is_dir() else path.parent
        self.saved = path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file())
        self._ids: list[int] | None = None
        where = f"--dataset {self.name}"
        try:
            if self.saved:
                self.ds = self._open_saved(hfd, where)
                self.streaming = False
            else:
                self.ds = self._open_streaming(hfd, where)
                self.streaming = True
        except DatasetError:
            raise
        except Exception as e:  # DatasetNotFoundError, FileNotFoundError, offline, a bad config name, ...
            raise DatasetError(f"{where}: cannot load it ({type(e).__name__}: {_first_line(e)}). Pass a Hub dataset "
                               "id or a local folder of parquet / json / imagefolder files or one written by "
                               "save_to_disk.") from e
        self._check_columns(hfd, where)

    # -- opening

    def _open_saved(self, hfd: Any, where: str) -> Any:
        if self.config:
            raise DatasetError(f"{where} is a folder written by save_to_disk, which has no configs; leave out "
                               f"--dataset-config {self.config}.")
        obj = hfd.load_from_disk(self.name)
        if isinstance(obj, hfd.DatasetDict):
            if self.split not in obj:
                raise DatasetError(f"--split {self.split}: {self.name} has no such split; its splits: "
                                   f"{', '.join(obj) or '(none)'}.")
            return obj[self.split]
        if obj.split is not None and str(obj.split) != self.split:
            raise DatasetError(f"--split {self.split}: {self.name} holds one split, {obj.split}; pass --split "
                               f"{obj.split}.")
        return obj

    def _open_streaming(self, hfd: Any, where: str) -> Any:
        try:
            splits = list(hfd.get_dataset_split_names(self.name, self.config))
        except Exception:  # some loaders cannot list splits without preparing the data: load_dataset says
            splits = None
        if splits is not None and self.split not in splits:
            raise DatasetError(f"--split {self.split}: {self.name} has no such split; its splits: "
                               f"{', '.join(splits) or '(none)'}.")
        return hfd.load_dataset(self.name, self.config, split=self.split, streaming=True)

    # -- checks

    @property
    def length(self) -> int | None:
        """Rows in the split, when known without reading it."""
        if not self.streaming:
            return len(self.ds)
        info = getattr(self.ds, "info", None)
        split = (getattr(info, "splits", None) or {}).get(self.split) if info is not None else None
        n = getattr(split, "num_examples", None)
        return int(n) if n else None

    def _check_columns(self, hfd: Any, where: str) -> None:
        features = self.ds.features
        first = None
        if features is None:  # a streamed json split: the columns are those of its first row
            first = next(iter(self.ds), None)
            columns = list(first) if first is not None else []
        else:
            columns = list(features)
        listed = ", ".join(columns) or "(none)"
        for option, col in (("--image-column", self.image_column), ("--question-column", self.question_column),
                            ("--id-column", self.id_column), ("--video-column", self.video_column)):
            if col is not None and col not in columns:
                raise DatasetError(f"{option} {col}: split {self.split} of {self.name} has no column {col!r}; its "
                                   f"columns: {listed}.")
        for column in (self.image_column, self.video_column):
            feature = features.get(column) if features is not None and column is not None else None
            if feature is not None and _is_image_feature(feature):
                self.ds = self.ds.cast_column(column, _undecoded(feature))  # decoded per row, own shard only
            elif feature is not None and isinstance(feature, hfd.Video):
                self.ds = self.ds.cast_column(column, hfd.Video(decode=False))  # its path; decoded by collection
        if first is None:
            first = next(iter(self.ds), None) if self.streaming else (self.ds[0] if len(self.ds) else None)
        if first is None:
            raise DatasetError(f"--split {self.split}: split {self.split} of {self.name} is empty (0 rows); pick "
                               "another split.")
        if self.image_column is not None:
            try:
                images = self._images(first[self.image_column], 0)
            except DatasetError as e:
                image_cols = [c for c, f in (features or {}).items() if _is_image_feature(f)]
                hint = f"columns holding images: {', '.join(image_cols)}" if image_cols else "no column is typed as images"
                raise DatasetError(f"--image-column {self.image_column} holds no images: {e} ({hint}; all columns: "
                                   f"{listed}).") from None
            if not images:
                raise DatasetError(f"--image-column {self.image_column}: the first row holds no image (an empty "
                                   f"list); columns: {listed}.")
        if self.video_column is not None:
            try:
                self._video(first[self.video_column], 0)
            except DatasetError as e:
                raise DatasetError(f"--video-column {self.video_column}: {e}; columns: {listed}.") from None
        question = first[self.question_column]
        if not isinstance(question, str) or not question.strip():
            raise DatasetError(f"--question-column {self.question_column}: the first row holds {question!r}, not a "
                               f"question (a non-empty string); columns: {listed}.")
        if self.id_column is not None:
            self._row_id(first, 0)

    # -- rows

    def _row_id(self, row: dict, index: int) -> int:
        if self.id_column is None:
            return index
        eid = row[self.id_column]
        if isinstance(eid, str) and eid.isdigit():
            eid = int(eid)
        if isinstance(eid, bool) or not isinstance(eid, int) or eid < 0:
            raise DatasetError(f"--id-column {self.id_column}: row {index} holds {eid!r}; ids must be non-negative "
                               "integers (leave --id-column out to number the rows 0, 1, ...).")
        return eid

    def _images(self, value: Any, index: int) -> list[Any]:
        """PIL images of one cell: ``datasets.Image`` values, paths, bytes, or a list of them."""
        from PIL import Image

        values = value if isinstance(value, (list, tuple)) else [value]
        out = []
        for v in values:
            if isinstance(v, Image.Image):
                out.append(v.convert("RGB"))
                continue
            data = path = None
            if isinstance(v, dict) and ("bytes" in v or "path" in v):
                data, path = v.get("bytes"), v.get("path")
            elif isinstance(v, (bytes, bytearray)):
                data = bytes(v)
            elif isinstance(v, str) and v:
                path = v
            else:
                raise DatasetError(f"row {index} holds {type(v).__name__} {str(v)[:40]!r}, not an image (a "
                                   "datasets.Image, a path, image bytes, or a list of them)")
            try:
                if data:
                    with Image.open(io.BytesIO(data)) as im:
                        out.append(im.convert("RGB"))
                else:
                    p = Path(path)
                    if not p.is_absolute() and self.local:
                        p = self.base / p
                    if not p.is_file():
                        raise DatasetError(f"row {index} holds {path[:40]!r}, not an image: no file {p} exists")
                    with Image.open(p) as im:
                        out.append(im.convert("RGB"))
            except (OSError, ValueError) as e:
                raise DatasetError(f"row {index}: cannot open the image {'bytes' if data else path!r} "
                                   f"({type(e).__name__}: {_first_line(e)})") from None
        return out

    def _video(self, value: Any, index: int) -> Any:
        """The :class:`~hf_vattr.pipeline.collection.Video` of one cell: a video file's path (a string or an
        undecoded ``datasets.Video`` value), or a list of frames (opened here, as image cells are)."""
        from .collection import CollectionError, Video, _row_video

        if isinstance(value, dict) and value.get("path"):
            value = value["path"]
        if isinstance(value, str) and value:
            path = Path(value)
            if not path.is_absolute() and self.local:
                path = self.base / path
            try:
                _row_video({"video": str(path), "fps": self.fps}, self.base)  # exists and opens as a video
            except CollectionError as e:
                raise DatasetError(f"row {index}: {e}") from None
            return Video(str(path), self.fps)
        if isinstance(value, (list, tuple)) and value:
            frames = self._images(value, index)
            sizes = {im.size for im in frames}
            if len(frames) < 2 or len(sizes) > 1:
                raise DatasetError(f"row {index} holds {len(frames)} frame(s) of sizes {sorted(sizes)}; a video needs "
                                   "at least 2 frames of one size")
            return Video(frames, self.fps)
        raise DatasetError(f"row {index} holds {type(value).__name__} {str(value)[:40]!r}, not a video (a video "
                           "file path, a datasets.Video value, or a list of at least 2 frames)")

    def prompt(self, question: str, num_images: int, num_videos: int = 0) -> list[dict]:
        content = [{"type": "video"} for _ in range(num_videos)] + [{"type": "image"} for _ in range(num_images)]
        content.append({"type": "text", "text": question})
        messages = [{"role": "user", "content": content}]
        if self.system_prompt:
            messages.insert(0, {"role": "system", "content": [{"type": "text", "text": self.system_prompt}]})
        return messages

    def example(self, row: dict, index: int) -> tuple[list[Any], Any]:
        images, videos = [], []
        if self.image_column is not None:
            try:
                images = self._images(row[self.image_column], index)
            except DatasetError as e:
                raise DatasetError(f"--image-column {self.image_column}: {e}.") from None
        if self.video_column is not None:
            try:
                videos = [self._video(row[self.video_column], index)]
            except DatasetError as e:
                raise DatasetError(f"--video-column {self.video_column}: {e}.") from None
        question = row[self.question_column]
        if not isinstance(question, str):
            raise DatasetError(f"--question-column {self.question_column}: row {index} holds {question!r}, not a "
                               "string.")
        return videos + images, self.prompt(question, len(images), len(videos))

    def rows(self, shard: tuple[int, int] | None = None) -> Iterator[tuple[int, list[Any], Any]]:
        """``(example_id, images, prompt)`` per row; rows of other shards as ``(example_id, [], None)``."""
        seen: set[int] = set()
        if not self.streaming and shard is not None:  # random access: other shards' rows are not read at all
            ids = self.ids()
            for i, eid in enumerate(ids):
                if i % shard[1] != shard[0]:
                    yield eid, [], None
                else:
                    yield (eid, *self.example(self.ds[i], i))
            return
        for i, row in enumerate(self.ds):
            eid = self._row_id(row, i)
            if eid in seen:
                raise DatasetError(f"--id-column {self.id_column}: id {eid} appears twice (row {i}); ids must be "
                                   "unique.")
            seen.add(eid)
            if shard is not None and i % shard[1] != shard[0]:
                yield eid, [], None
            else:
                yield (eid, *self.example(row, i))

    def ids(self) -> list[int]:
        """Every example id of the split, in order (a streamed split is read once, without its images)."""
        if self._ids is None:
            if self.id_column is None and self.length is not None:
                ids = list(range(self.length))
            else:
                ds = self.ds
                if self.id_column is not None:
                    ds = ds.select_columns([self.id_column])
                    column = ds[self.id_column] if not self.streaming else (row[self.id_column] for row in ds)
                    rows = ({self.id_column: v} for v in column)
                else:
                    rows = ds.select_columns([self.question_column])
                ids = [self._row_id(row, i) for i, row in enumerate(rows)]
                if len(set(ids)) != len(ids):
                    dup = next(x for x in ids if ids.count(x) > 1)
                    raise DatasetError(f"--id-column {self.id_column}: id {dup} appears more than once; ids must "
                                       "be unique.")
            self._ids = ids
        return self._ids

    def get(self, example_id: int) -> tuple[list[Any], Any]:
        ids = self.ids()
        try:
            index = ids.index(example_id)
        except ValueError:
            raise KeyError(example_id) from None
        row = self.ds[index] if not self.streaming else next(iter(self.ds.skip(index).take(1)))
        return self.example(row, index)

    # -- fingerprint

    def content_fingerprint(self) -> str:
        """What the split holds, as a hash: see :func:`hf_dataset_spec`."""
        if self.saved:
            return f"datasets:{self.ds._fingerprint}"
        if self.local:
            h = hashlib.sha256()
            root = Path(self.name)
            files = [root] if root.is_file() else sorted(
                p for p in root.rglob("*") if p.is_file() and not any(part.startswith(".")
                                                                      for part in p.relative_to(root).parts))
            for f in files:
                h.update(str(f.relative_to(root) if f != root else f.name).encode() + b"\0")
                with open(f, "rb") as fh:
                    for chunk in iter(lambda: fh.read(1 << 20), b""):
                        h.update(chunk)
            return f"sha256:{h.hexdigest()}"
        import datasets as hfd

        try:
            builder = hfd.load_dataset_builder(self.name, self.config)
            return f"builder:{builder.hash}:{builder.config_id}"
        except Exception:  # noqa: BLE001 - the name, config and split still tell datasets apart
            return f"hub:{self.name}"
