"""``hf-vattr``: collect ground truth, train, evaluate and push estimators; one command each.

    hf-vattr collect --toy 64 --out runs/toy-gt                      # built-in toy task and model
    hf-vattr collect --model Qwen/Qwen3-VL-8B-Thinking --prompts data.jsonl --out runs/gt --device-map auto
    accelerate launch -m hf_vattr.cli collect --model ... --prompts data.jsonl --out runs/gt   # sharded
    hf-vattr train runs/gt --out runs/estimator
    hf-vattr eval runs/gt --estimator runs/estimator --model Qwen/...   # markdown table + JSON
    hf-vattr push runs/estimator your-name/qwen3-vl-8b-vattr
    hf-vattr demo ...                                                   # see hf_vattr.demo

``--prompts`` is a JSON-lines file, one example per line::

    {"id": 0, "image": "cat.png", "prompt": "What is the cat doing?"}
    {"id": 1, "images": ["a.png", "b.png"], "messages": [{"role": "user", "content": [...]}]}

(``id`` defaults to the line number; image paths are relative to ``--images-dir``, else to the
JSONL file's folder; ``answer`` may be given for trajectory analysis.) ``collect`` records in
``<out>/dataset.json`` how to rebuild the examples, so ``eval`` can re-run the model on them.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from transformers.utils import logging

logger = logging.get_logger("hf_vattr.cli")

DATASET_FILE = "dataset.json"
TRAINING_REPORT = "training_report.json"
DEFAULT_EVAL_JSON = "eval_report.json"


# ----------------------------------------------------------------------------- datasets


class DatasetSpec:
    """How to (re)build the examples of a collection: ``(example_id, images, prompt)`` triples."""

    def __init__(self, kind: str, **params: Any) -> None:
        if kind not in ("toy", "jsonl"):
            raise ValueError(f"unknown dataset kind {kind!r}")
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

    def __len__(self) -> int:
        return int(self.params["n"]) if self.kind == "toy" else len(self._jsonl_rows())

    def _toy(self, index: int):
        from .toy import example_seed, make_example

        return make_example(example_seed(int(self.params.get("seed", 0)), index))

    @staticmethod
    def _toy_prompt(ex: Any) -> Any:
        from .toy import prompt_messages

        return prompt_messages(ex)

    def _iter(self):
        if self.kind == "toy":
            for i in range(int(self.params["n"])):
                ex = self._toy(i)
                yield i, [ex.image], self._toy_prompt(ex)
        else:
            for eid, images, prompt, _ in self._jsonl_rows():
                yield eid, images, prompt

    def _jsonl_rows(self) -> list[tuple[int, list[str], Any, Any]]:
        """Parsed JSONL rows ``(id, image paths, prompt, answer)``; images are not opened here."""
        if "_rows" in self.__dict__:
            return self.__dict__["_rows"]
        path = Path(self.params["path"])
        base = Path(self.params.get("images_dir") or path.parent)
        rows = []
        seen = set()
        for line_no, line in enumerate(path.read_text().splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise SystemExit(f"{path}:{line_no + 1}: not valid JSON ({e}).") from None
            eid = int(row.get("id", line_no))
            if eid in seen:
                raise SystemExit(f"{path}:{line_no + 1}: duplicate id {eid}; ids must be unique.")
            seen.add(eid)
            names = row.get("images") or ([row["image"]] if row.get("image") else [])
            if not names:
                raise SystemExit(f"{path}:{line_no + 1}: no 'image' / 'images' given.")
            images = [str(Path(n) if os.path.isabs(n) else base / n) for n in names]
            for im in images:
                if not Path(im).is_file():
                    raise SystemExit(f"{path}:{line_no + 1}: image {im} not found.")
            prompt = row.get("messages") or row.get("prompt")
            if prompt is None:
                raise SystemExit(f"{path}:{line_no + 1}: no 'prompt' / 'messages' given.")
            rows.append((eid, images, prompt, row.get("answer")))
        self.__dict__["_rows"] = rows
        return rows


class _Items:
    """Sized lazy iterable over a dataset's examples (what :func:`hf_vattr.collection.collect` takes)."""

    def __init__(self, spec: DatasetSpec, limit: int | None) -> None:
        self.spec, self.limit = spec, limit

    def __len__(self) -> int:
        n = len(self.spec)
        return n if self.limit is None else min(n, self.limit)

    def __iter__(self):
        for i, item in enumerate(self.spec._iter()):
            if self.limit is not None and i >= self.limit:
                return
            yield item


def _read_dataset_spec(collection: Path) -> DatasetSpec | None:
    p = collection / DATASET_FILE
    return DatasetSpec.from_dict(json.loads(p.read_text())) if p.exists() else None


# ----------------------------------------------------------------------------- model loading


def _load_model(model_id: str | None, *, toy: bool, dtype: str, device_map: str | None, attn: str,
                revision: str | None = None, device: str | None = None):
    import torch
    import transformers

    if model_id is None:
        if not toy:
            raise SystemExit("--model is required (or use --toy N with the built-in toy model).")
        from .toy import load_toy_model

        try:
            model, processor = load_toy_model(attn)
        except FileNotFoundError as e:
            raise SystemExit(f"{e}\nPass --model to use another model.") from None
        from .toy import toy_checkpoint_path

        model_id = str(toy_checkpoint_path())
    else:
        kwargs: dict[str, Any] = {"attn_implementation": attn}
        if dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        else:
            kwargs["dtype"] = "auto"
        if revision:
            kwargs["revision"] = revision
        if device_map:
            kwargs["device_map"] = device_map if device_map in ("auto", "balanced", "sequential") else \
                {"": device_map}
        model = transformers.AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
        processor = transformers.AutoProcessor.from_pretrained(model_id, revision=revision)
    if device and not device_map:
        model.to(device)
    model.eval()
    return model, processor, model_id


# ----------------------------------------------------------------------------- commands


def cmd_collect(args: argparse.Namespace) -> int:
    from .collection import CollectionConfig, collect

    if (args.toy is None) == (args.prompts is None):
        raise SystemExit("collect needs exactly one dataset: --toy N or --prompts FILE.jsonl.")
    if args.toy is not None:
        spec = DatasetSpec("toy", n=int(args.toy), seed=int(args.toy_seed))
    else:
        spec = DatasetSpec("jsonl", path=str(Path(args.prompts).resolve()),
                           images_dir=str(Path(args.images_dir).resolve()) if args.images_dir else None)
    items = spec.items(limit=args.limit)

    from accelerate import PartialState

    state = PartialState()
    device_map = args.device_map
    device = None
    if device_map is None and state.num_processes > 1:
        device = str(state.device)  # one full model copy per process
    elif device_map is None and args.device:
        device = args.device
    model, processor, model_id = _load_model(args.model, toy=args.toy is not None, dtype=args.dtype,
                                             device_map=device_map, attn=args.attn_implementation,
                                             revision=args.revision, device=device)
    config = CollectionConfig(
        num_subsets=args.num_subsets, keep_prob=args.keep_prob, max_new_tokens=args.max_new_tokens,
        region_method=args.region_method, k=args.k, pooling=args.pooling, batch_size=args.batch_size,
        seed=args.seed, method=args.method, pixel_fill=args.pixel_fill,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        (out / DATASET_FILE).write_text(json.dumps({**spec.to_dict(), "model": model_id,
                                                    "revision": args.revision}, indent=2) + "\n")
    result = collect(model, processor, items, out, config, progress=not args.quiet)
    if state.is_main_process:
        print(f"collected {len(result['written'])} examples ({len(result['skipped'])} already on disk) into {out}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from .collection import load_collection, read_manifest
    from .training import TrainingConfig, fit_estimator

    collection = Path(args.collection)
    records = load_collection(collection)
    if not records:
        raise SystemExit(f"{collection} holds no examples; run `hf-vattr collect` first.")
    try:
        manifest = read_manifest(collection)
    except FileNotFoundError:
        manifest = {}
    model_info = manifest.get("model", {})
    ccfg = manifest.get("config", {})
    dataset = _read_dataset_spec(collection)
    base_model_id = args.base_model_id or (dataset.params.get("model") if dataset else None) or \
        model_info.get("name_or_path") or None
    target = args.target
    if target == "auto":  # both correlations when the collection has random subsets (the toy runs: best LDS and R^2)
        has_subsets = all(getattr(r, "subset_effects", None) is not None and r.subset_effects.numel() > 0
                          for r in records)
        target = "both" if has_subsets else "loo"
    config = TrainingConfig(
        epochs=args.epochs, lr=args.lr, weight_decay=args.weight_decay, nonnegative=args.nonnegative,
        use_bias=args.use_bias, val_fraction=args.val_fraction, seed=args.seed, target=target,
        optimizer=args.optimizer, calibrate=not args.no_calibrate, batch_size=args.batch_size,
    )
    extra = {"collection": collection.name}
    if ccfg:
        extra.update({"ablation_method": ccfg.get("method"), "keep_prob": ccfg.get("keep_prob")})
    if dataset is not None:
        extra["dataset"] = dataset.kind + (f" ({dataset.params.get('n')} toy examples)" if dataset.kind == "toy"
                                           else "")
    estimator, report = fit_estimator(
        records, config=config, model_type=model_info.get("model_type") or None, base_model_id=base_model_id,
        base_model_revision=args.base_model_revision or (dataset.params.get("revision") if dataset else None),
        pooling=ccfg.get("pooling"), region_method=ccfg.get("region_method", "grid"),
        k_policy={"k": ccfg["k"]} if "k" in ccfg else None, extra_training_data=extra, progress=not args.quiet,
    )
    out = Path(args.out)
    estimator.save_pretrained(out)
    (out / TRAINING_REPORT).write_text(json.dumps(report, indent=2, default=float) + "\n")
    m = estimator.training_metrics or {}
    shown = ", ".join(f"{k}={v:.3f}" for k, v in m.items() if isinstance(v, float))
    print(f"trained on {report['data']['num_train_examples']} examples ({report['data']['num_train_spans']} spans); "
          f"held-out ({m.get('split')}): {shown}")
    print(f"estimator saved to {out}")
    return 0


def _parse_methods(text: str | None, has_model: bool) -> list[str]:
    if text:
        return [m.strip() for m in text.split(",") if m.strip()]
    base = ["estimator", "raw_attention", "random"]
    if has_model:
        base[2:2] = ["leave_one_out", "grad_x_input", "integrated_gradients"]
    return base


def cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from .baselines import make_method
    from .collection import _build_inputs, load_collection
    from .estimator import LinearEstimator
    from .evaluation import evaluate, trajectory_report

    collection = Path(args.collection)
    records = load_collection(collection)
    if not records:
        raise SystemExit(f"{collection} holds no examples.")
    estimator = None
    if args.estimator:
        estimator = LinearEstimator.from_pretrained(args.estimator)
    split = args.split
    if split in ("auto", "val"):
        report_path = Path(args.estimator) / TRAINING_REPORT if args.estimator and Path(args.estimator).is_dir() \
            else None
        val_ids = None
        if report_path is not None and report_path.exists():
            val_ids = set(json.loads(report_path.read_text()).get("split", {}).get("val") or [])
        if val_ids:
            records = [r for r in records if str(r.example_id) in val_ids]
            split = "val"
        elif split == "val":
            raise SystemExit("--split val: the estimator folder has no training_report.json with held-out ids.")
        else:
            split = "all"
    if args.max_examples is not None:
        records = records[: args.max_examples]

    dataset = _read_dataset_spec(collection)
    model = processor = None
    inputs_fn = None
    if args.model or (args.with_model and dataset is not None):
        model_id = args.model or (dataset.params.get("model") if dataset else None)
        toy = dataset is not None and dataset.kind == "toy" and model_id is None
        model, processor, _ = _load_model(model_id, toy=toy, dtype=args.dtype, device_map=args.device_map,
                                          attn=args.attn_implementation, device=args.device)
        if estimator is not None:
            estimator.check_compatible(model)
        if dataset is None:
            raise SystemExit(f"{collection / DATASET_FILE} is missing, so the prompts cannot be rebuilt for the model; "
                             "evaluate without --model (stored ground truth only).")
        def inputs_fn(record):
            try:
                images, prompt = dataset.get(record.example_id)
            except KeyError:
                raise SystemExit(f"example {record.example_id} is not in the dataset described by {DATASET_FILE}.") \
                    from None
            inputs = _build_inputs(processor, images, prompt)
            ids = record.sequence[: record.prompt_len]
            if inputs["input_ids"].shape[-1] != record.prompt_len or not torch.equal(inputs["input_ids"][0], ids):
                raise SystemExit(f"example {record.example_id}: rebuilt prompt differs from the collected one "
                                 "(different processor or dataset?).")
            return inputs

    names = _parse_methods(args.methods, model is not None)
    methods = []
    for n in names:
        kwargs: dict[str, Any] = {}
        if n in ("integrated_gradients", "ig"):
            kwargs["steps"] = args.ig_steps
        if n == "random":
            kwargs["seed"] = args.seed
        if n == "estimator" and estimator is None:
            raise SystemExit("method 'estimator' needs --estimator DIR.")
        methods.append(make_method(n, estimator=estimator, **kwargs))
    report = evaluate(methods, records, model, processor, ks=tuple(args.ks), topk=args.topk,
                      batch_size=args.batch_size, inputs_fn=inputs_fn, progress=not args.quiet)
    report.info.update(split=split, collection=str(collection), estimator=args.estimator)
    if args.trajectories:
        labels = _labels(dataset, records)
        if labels is None:
            logger.warning("--trajectories: no correctness labels (toy dataset or JSONL 'answer'); skipped.")
        else:
            src = None
            if estimator is not None:
                src = [estimator(torch.as_tensor(r.span_features)).detach() for r in records]
            report.info["trajectories"] = trajectory_report([r for r in records], labels, scores=src)
    print(report.to_markdown())
    if "trajectories" in report.info:
        print("\n" + _trajectory_markdown(report.info["trajectories"]))
    if args.json:
        out = Path(args.json)
    elif args.estimator and Path(args.estimator).is_dir():
        out = Path(args.estimator) / DEFAULT_EVAL_JSON
    else:  # no estimator, or one from the Hub: next to the collection
        out = collection / DEFAULT_EVAL_JSON
    report.save(out)
    print(f"\nJSON report written to {out}")
    return 0


def _trajectory_markdown(traj: dict) -> str:
    def fmt(v):
        return "n/a" if v is None else f"{v:.3f}"

    lines = ["| Outcome | Traces | Steps | Path length | Tortuosity (median) | Concentration |",
             "|---|---:|---:|---:|---:|---:|"]
    for name in ("correct", "incorrect"):
        g = traj["groups"].get(name, {})
        lines.append(f"| {name} | {g.get('n', 0)} | {fmt(g.get('num_steps'))} | {fmt(g.get('path_length'))} | "
                     f"{fmt(g.get('tortuosity_median'))} | {fmt(g.get('mean_concentration'))} |")
    auc = traj.get("failure_auc") or {}
    if auc.get("auc"):
        pairs = ", ".join(f"{f:.1f}: {fmt(a)}" for f, a in zip(auc["fraction"], auc["auc"]))
        lines.append(f"\nFailure AUC of tortuosity by reasoning progress: {pairs}")
    return "\n".join(lines)


def _labels(dataset: DatasetSpec | None, records: Sequence[Any]) -> list[bool] | None:
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


def cmd_push(args: argparse.Namespace) -> int:
    from .estimator import LinearEstimator

    estimator = LinearEstimator.from_pretrained(args.estimator)
    url = estimator.push_to_hub(args.repo_id, private=args.private, token=args.token, branch=args.branch,
                                commit_message=args.commit_message)
    print(f"pushed {args.estimator} to {args.repo_id}: {url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("hf_vattr.demo")  # honours sys.modules (tests swap the module)
    except ImportError as e:
        if getattr(e, "name", None) in ("hf_vattr.demo", "demo") or "hf_vattr.demo" in str(e):
            print("hf-vattr demo is not available in this version of hf_vattr (hf_vattr/demo.py is missing).",
                  file=sys.stderr)
            return 2
        raise
    result = demo.main(args)
    return int(result or 0)


# ----------------------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vattr", description="Live, faithful visual attribution for VLMs: "
                                     "collect ground truth, train, evaluate and push estimators.")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", metavar="{collect,train,eval,push,demo}")
    sub.required = True

    def model_args(p, required=False):
        p.add_argument("--model", required=required, help="model id or local folder (default for --toy: the toy model)")
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
        p.add_argument("--device-map", default=None, help="e.g. auto (big models), or a device such as cuda:0")
        p.add_argument("--device", default=None, help="move the model to this device (when no --device-map)")
        p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"])

    c = sub.add_parser("collect", help="generate traces and record features + ablation ground truth")
    model_args(c)
    c.add_argument("--revision", default=None)
    c.add_argument("--toy", type=int, default=None, metavar="N", help="use N examples of the built-in toy task")
    c.add_argument("--toy-seed", type=int, default=0)
    c.add_argument("--prompts", default=None, help="JSON-lines dataset (see `hf-vattr --help`)")
    c.add_argument("--images-dir", default=None)
    c.add_argument("--out", required=True, help="collection folder (resumable)")
    c.add_argument("--limit", type=int, default=None)
    c.add_argument("--k", type=int, default=16, help="regions per image")
    c.add_argument("--region-method", default="grid")
    c.add_argument("--num-subsets", type=int, default=32)
    c.add_argument("--keep-prob", type=float, default=0.5)
    c.add_argument("--max-new-tokens", type=int, default=256)
    c.add_argument("--pooling", default="sum", choices=["sum", "mean"])
    c.add_argument("--batch-size", type=int, default=16, help="ablation masks per forward")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--method", default="attention", choices=["attention", "pixel"])
    c.add_argument("--pixel-fill", default="mean", choices=["mean", "blur"])
    c.add_argument("--quiet", action="store_true")
    c.set_defaults(func=cmd_collect)

    t = sub.add_parser("train", help="fit a LinearEstimator on a collection")
    t.add_argument("collection")
    t.add_argument("--out", required=True, help="estimator folder (config.json, model.safetensors, README.md)")
    t.add_argument("--epochs", type=int, default=300)
    t.add_argument("--lr", type=float, default=0.02)
    t.add_argument("--weight-decay", type=float, default=0.0)
    t.add_argument("--nonnegative", action="store_true")
    t.add_argument("--use-bias", action="store_true")
    t.add_argument("--val-fraction", type=float, default=0.2)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--target", default="auto", choices=["auto", "loo", "subsets", "both"],
                   help="what the Pearson loss correlates: auto = both when the collection has random subsets, "
                        "else loo")
    t.add_argument("--optimizer", default="adam", choices=["adam", "lbfgs"])
    t.add_argument("--batch-size", type=int, default=None, help="spans per step (default: full batch)")
    t.add_argument("--no-calibrate", action="store_true", help="keep raw-attention units (no least-squares scale)")
    t.add_argument("--base-model-id", default=None)
    t.add_argument("--base-model-revision", default=None)
    t.add_argument("--quiet", action="store_true")
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("eval", help="compare the estimator with baselines; prints a markdown table, writes JSON")
    e.add_argument("collection")
    e.add_argument("--estimator", default=None, help="estimator folder or Hub id")
    model_args(e)
    e.add_argument("--with-model", action="store_true",
                   help="load the model recorded by collect (dataset.json) without naming it")
    e.add_argument("--methods", default=None, help="comma list: estimator, raw_attention, leave_one_out, "
                   "grad_x_input, integrated_gradients, random (default: all that can run)")
    e.add_argument("--split", default="auto", choices=["auto", "val", "all"],
                   help="auto: the estimator's held-out examples when known, else all")
    e.add_argument("--max-examples", type=int, default=None)
    e.add_argument("--ks", type=int, nargs="+", default=[1, 3, 5])
    e.add_argument("--topk", default="auto", choices=["auto", "measure", "table"])
    e.add_argument("--ig-steps", type=int, default=16)
    e.add_argument("--batch-size", type=int, default=16)
    e.add_argument("--seed", type=int, default=0)
    e.add_argument("--trajectories", action="store_true", help="add trajectory stats and failure AUC (needs labels)")
    e.add_argument("--json", default=None,
                   help=f"where to write the JSON report (default <estimator>/{DEFAULT_EVAL_JSON})")
    e.add_argument("--quiet", action="store_true")
    e.set_defaults(func=cmd_eval)

    p = sub.add_parser("push", help="upload an estimator folder to the Hub")
    p.add_argument("estimator")
    p.add_argument("repo_id")
    p.add_argument("--private", action="store_true", default=None)
    p.add_argument("--token", default=None)
    p.add_argument("--branch", default=None)
    p.add_argument("--commit-message", default="Push hf_vattr LinearEstimator")
    p.set_defaults(func=cmd_push)

    # Everything after `demo` is the demo's own (parsed by hf_vattr.demo.main from args.demo_args).
    d = sub.add_parser("demo", help="interactive demo (hf_vattr.demo; its options follow)", add_help=False)
    d.set_defaults(func=cmd_demo, demo_args=[])
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        args.demo_args = list(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verbose:
        logging.set_verbosity_info()
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
