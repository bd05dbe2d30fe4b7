"""`hf-vattr collect --dataset`: a `datasets` split as the source (save_to_disk, parquet, imagefolder), offline."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

datasets = pytest.importorskip("datasets")

from hf_vattr.commands import cli  # noqa: E402
from hf_vattr.commands.cli import main  # noqa: E402
from hf_vattr.pipeline.datasets import DatasetError, DatasetSpec, hf_dataset_spec, read_dataset_spec  # noqa: E402
from hf_vattr.testing import example_image  # noqa: E402

QUESTIONS = ["What colour is the square?", "Where is the largest shape?", "How many shapes are there?",
             "Is the red shape left of the blue one?"]


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    example_image(64, 96, seed=seed).save(buf, format="PNG")
    return buf.getvalue()


def _rows(n: int = 4) -> dict:
    return {"image": [example_image(64, 96, seed=i) for i in range(n)], "question": QUESTIONS[:n],
            "qid": [10 + i for i in range(n)]}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    """A DatasetDict written by save_to_disk: train (4 rows, datasets.Image), test (empty)."""
    path = tmp_path_factory.mktemp("saved") / "ds"
    features = datasets.Features({"image": datasets.Image(), "question": datasets.Value("string"),
                                  "qid": datasets.Value("int64")})
    train = datasets.Dataset.from_dict(_rows(), features=features)
    empty = datasets.Dataset.from_dict({"image": [], "question": [], "qid": []}, features=features)
    datasets.DatasetDict({"train": train, "test": empty}).save_to_disk(str(path), num_shards={"train": 1, "test": 1})
    return path


@pytest.fixture(scope="module")
def parquet(tmp_path_factory) -> Path:
    """A folder with data/train.parquet: images as bytes, as lists of images, as paths; a text-only column."""
    root = tmp_path_factory.mktemp("parquet")
    (root / "imgs").mkdir()
    for i in range(3):
        (root / "imgs" / f"{i}.png").write_bytes(_png(i))
    features = datasets.Features({"image": datasets.Image(), "pair": datasets.List(datasets.Image()),
                                  "raw": datasets.Value("binary"), "file": datasets.Value("string"),
                                  "question": datasets.Value("string")})
    ds = datasets.Dataset.from_dict({
        "image": [example_image(64, 96, seed=i) for i in range(3)],
        "pair": [[example_image(64, 96, seed=i), example_image(64, 96, seed=i + 5)] for i in range(3)],
        "raw": [_png(i) for i in range(3)], "file": [f"imgs/{i}.png" for i in range(3)],
        "question": QUESTIONS[:3]}, features=features)
    (root / "data").mkdir()
    ds.to_parquet(str(root / "data" / "train.parquet"))
    return root


@pytest.fixture(scope="module")
def imagefolder(tmp_path_factory) -> Path:
    """An imagefolder: train/*.png with a metadata.jsonl that holds the questions."""
    root = tmp_path_factory.mktemp("imagefolder")
    (root / "train").mkdir()
    with open(root / "train" / "metadata.jsonl", "w") as f:
        for i in range(3):
            (root / "train" / f"{i}.png").write_bytes(_png(i))
            f.write(json.dumps({"file_name": f"{i}.png", "question": QUESTIONS[i]}) + "\n")
    return root


def _items(spec, **kw):
    return list(spec.items(**kw))


def test_save_to_disk_folder_gives_images_prompts_and_ids(saved):
    spec = hf_dataset_spec(str(saved), "train", "image", "question", id_column="qid", system_prompt="Be brief.")
    items = _items(spec)
    assert [eid for eid, _, _ in items] == [10, 11, 12, 13] and len(spec) == 4 and spec.ids() == [10, 11, 12, 13]
    eid, images, prompt = items[1]
    assert len(images) == 1 and images[0].size == (96, 64) and images[0].mode == "RGB"
    assert prompt[0] == {"role": "system", "content": [{"type": "text", "text": "Be brief."}]}
    assert prompt[1]["content"] == [{"type": "image"}, {"type": "text", "text": QUESTIONS[1]}]
    assert list(images[0].tobytes()) == list(example_image(64, 96, seed=1).convert("RGB").tobytes())
    # rebuilt from what dataset.json records (eval): the same prompt and pixels
    again = DatasetSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    imgs, p = again.get(12)
    assert p == items[2][2] and list(imgs[0].tobytes()) == list(items[2][1][0].tobytes())
    with pytest.raises(KeyError):
        again.get(3)


def test_each_process_decodes_only_its_own_shard(saved, parquet):
    for spec in (hf_dataset_spec(str(saved), "train", "image", "question"),
                 hf_dataset_spec(str(parquet), "train", "image", "question")):
        rows = _items(spec, shard=(1, 2))
        assert [eid for eid, _, _ in rows] == list(range(len(rows)))
        for i, (_, images, prompt) in enumerate(rows):
            assert (images == [] and prompt is None) if i % 2 == 0 else (len(images) == 1 and prompt is not None)


def test_parquet_folder_streams_images_as_bytes_lists_and_paths(parquet):
    spec = hf_dataset_spec(str(parquet), "train", "image", "question")
    assert spec._hf().streaming  # load_dataset(..., streaming=True)
    reference = [ims[0] for _, ims, _ in _items(spec)]
    assert len(reference) == 3 and len(spec) == 3
    for column in ("raw", "file"):
        other = [ims[0] for _, ims, _ in _items(hf_dataset_spec(str(parquet), "train", column, "question"))]
        assert [list(a.tobytes()) for a in other] == [list(b.tobytes()) for b in reference], column
    pairs = _items(hf_dataset_spec(str(parquet), "train", "pair", "question"))
    assert all(len(ims) == 2 for _, ims, _ in pairs)
    assert pairs[0][2][0]["content"][:2] == [{"type": "image"}, {"type": "image"}]
    assert [eid for eid, _, _ in _items(spec, limit=2)] == [0, 1]


def test_imagefolder(imagefolder):
    spec = hf_dataset_spec(str(imagefolder), "train", "image", "question")
    items = _items(spec)
    assert len(items) == 3 and {it[2][0]["content"][1]["text"] for it in items} == set(QUESTIONS[:3])


def test_fingerprint_follows_the_content_not_the_place(parquet, tmp_path):
    import shutil

    from hf_vattr.pipeline.collection import dataset_fingerprint

    a = hf_dataset_spec(str(parquet), "train", "image", "question").to_dict()
    moved = tmp_path / "moved"
    shutil.copytree(parquet, moved)
    b = hf_dataset_spec(str(moved), "train", "image", "question").to_dict()
    assert dataset_fingerprint(a) == dataset_fingerprint(b)
    c = hf_dataset_spec(str(moved), "train", "file", "question").to_dict()
    assert dataset_fingerprint(a) != dataset_fingerprint(c)  # another column: other examples
    (moved / "imgs" / "extra.txt").write_text("changed")
    assert dataset_fingerprint(b) != dataset_fingerprint(hf_dataset_spec(str(moved), "train", "image",
                                                                          "question").to_dict())


# ----------------------------------------------------------------------------- bad input, before any model loads


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the options were checked")

    monkeypatch.setattr(cli, "_load_model", refuse)


def _refused(capsys, argv, *words):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and err.startswith("hf-vattr collect: error:"), err
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.mark.parametrize("which", ["saved", "parquet"])
def test_bad_columns_and_splits_fail_before_the_model(which, saved, parquet, tmp_path, capsys, no_model):
    path = str(saved if which == "saved" else parquet)
    base = ["collect", "--model", "tiny/model", "--dataset", path, "--out", str(tmp_path / "gt")]
    _refused(capsys, base + ["--split", "train", "--image-column", "picture", "--question-column", "question"],
             "--image-column picture", "no column 'picture'", "image", "question")
    _refused(capsys, base + ["--split", "train", "--image-column", "image", "--question-column", "q"],
             "--question-column q", "its columns:")
    _refused(capsys, base + ["--split", "validation", "--image-column", "image", "--question-column", "question"],
             "--split validation", "its splits:", "train")
    _refused(capsys, base + ["--split", "train", "--image-column", "question", "--question-column", "question"],
             "--image-column question", "holds no images", "columns holding images: image")
    _refused(capsys, base + ["--image-column", "image", "--question-column", "question"], "--split")
    assert not (tmp_path / "gt").exists()


def test_an_empty_split_and_stray_options_are_refused(saved, tmp_path, capsys, no_model):
    base = ["collect", "--model", "tiny/model", "--out", str(tmp_path / "gt")]
    _refused(capsys, base + ["--dataset", str(saved), "--split", "test", "--image-column", "image",
                             "--question-column", "question"], "split test", "empty")
    _refused(capsys, base + ["--dataset", str(tmp_path / "nowhere"), "--split", "train", "--image-column", "image",
                             "--question-column", "question"], "--dataset", "cannot load it")
    _refused(capsys, base + ["--toy", "2", "--split", "train"], "--split", "only go with --dataset")
    _refused(capsys, base + ["--toy", "2", "--dataset", str(saved)], "exactly one dataset")


# ----------------------------------------------------------------------------- collect with a tiny model


@pytest.mark.slow
def test_collect_from_a_dataset_resumes_and_refuses_another(saved, parquet, tiny_model_dir, tmp_path, capsys):
    from hf_vattr.pipeline.collection import load_collection, read_manifest

    out = tmp_path / "gt"
    argv = ["collect", "--model", str(tiny_model_dir), "--dataset", str(saved), "--split", "train",
            "--image-column", "image", "--question-column", "question", "--id-column", "qid", "--out", str(out),
            "--max-new-tokens", "12", "--k", "4", "--num-subsets", "2", "--quiet"]
    assert main(argv + ["--limit", "2"]) == 0
    assert "not complete" in capsys.readouterr().out
    manifest = read_manifest(out)
    assert manifest["examples"] == [10, 11] and manifest["complete"] is False
    assert manifest["dataset"]["kind"] == "datasets" and manifest["dataset_fingerprint"]
    assert main(argv) == 0
    assert "collected 2 examples (2 already on disk)" in capsys.readouterr().out
    assert read_manifest(out)["complete"] is True
    records = load_collection(out)
    assert [r.example_id for r in records] == [10, 11, 12, 13]
    spec = read_dataset_spec(out)
    assert spec.kind == "datasets" and spec.params["model"] == str(tiny_model_dir)
    # eval rebuilds the same prompt from dataset.json
    from hf_vattr.pipeline.collection import _build_inputs
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_model_dir)
    images, prompt = spec.get(12)
    ids = _build_inputs(processor, images, prompt)["input_ids"][0]
    rec = records[2]
    assert ids.tolist() == rec.sequence[: rec.prompt_len].tolist()
    # another dataset into the same folder: refused before the model loads
    other = ["collect", "--model", str(tiny_model_dir), "--dataset", str(parquet), "--split", "train",
             "--image-column", "image", "--question-column", "question", "--out", str(out), "--quiet"]
    assert main(other) == 2
    assert "different dataset" in capsys.readouterr().err


def test_spec_kinds_are_checked():
    with pytest.raises(DatasetError, match="'datasets'"):
        DatasetSpec("csv")
