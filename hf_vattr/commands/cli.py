"""``hf-vattr``: collect ground truth, train, evaluate and push estimators; one command each.

    hf-vattr collect --toy 64 --out runs/toy-gt                      # built-in toy task and model
    hf-vattr collect --model Qwen/Qwen3-VL-8B-Thinking --prompts data.jsonl --out runs/gt --device-map auto
    accelerate launch -m hf_vattr.commands.cli collect --model ... --prompts data.jsonl --out runs/gt   # sharded
    hf-vattr collect --model ... --dataset org/vqa --split test --image-column image --question-column question \
        --out runs/gt                                                # any datasets.load_dataset source
    hf-vattr collect --toy 100 --like runs/estimator --out runs/gt2   # an estimator's settings
    hf-vattr train runs/gt --out runs/estimator
    hf-vattr eval runs/gt --estimator runs/estimator --model Qwen/...   # markdown table + JSON
    hf-vattr push runs/estimator your-name/qwen3-vl-8b-vattr
    hf-vattr demo                                                       # toy model, offline, on CPU
    hf-vattr app                                                        # live web page (toy model by default)

The options of ``collect`` and ``train`` that configure the pipeline are generated from
:class:`~hf_vattr.pipeline.collection.CollectionConfig` and :class:`~hf_vattr.pipeline.training.TrainingConfig`
(their fields' defaults and ``help`` metadata), so each is written once. The ``--prompts``
JSON-lines format is documented in :mod:`hf_vattr.pipeline.datasets` and in ``hf-vattr collect --help``.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import typing
from pathlib import Path
from typing import Any, Sequence

from transformers.utils import logging

from ..pipeline.datasets import DATASET_FILE, DatasetSpec, correctness_labels, read_dataset_spec
from ..errors import AttributionError
from ..options import argparse_type, interval, range_help

logger = logging.get_logger("hf_vattr.commands.cli")


class UsageError(AttributionError, ValueError):
    """A mistake in the command line or in the files it names: printed as one line, exit status 2."""

TRAINING_REPORT = "training_report.json"
DEFAULT_EVAL_JSON = "eval_report.json"


# ----------------------------------------------------------------------------- model loading


def _load_model(model_id: str | None, *, toy: bool, dtype: str, device_map: str | None, attn: str,
                revision: str | None = None, device: str | None = None, quantization: str | None = None):
    import torch
    import transformers

    quantization_config = _quantization_config(quantization)
    if model_id is None and toy and quantization_config is not None:
        from ..toy import toy_checkpoint_path

        model_id = str(toy_checkpoint_path())  # the toy is a plain model folder: load it quantized like any other
    if model_id is None:
        if not toy:
            raise UsageError("--model is required (or use --toy N with the built-in toy model).")
        from ..toy import load_toy_model

        try:
            model, processor = load_toy_model(attn)
        except FileNotFoundError as e:
            raise UsageError(f"{e} Pass --model to use another model.") from None
        from ..toy import toy_checkpoint_path

        model_id = str(toy_checkpoint_path())
    else:
        kwargs: dict[str, Any] = {"attn_implementation": attn}
        if dtype != "auto":
            kwargs["dtype"] = getattr(torch, dtype)
        else:
            kwargs["dtype"] = "auto"
        if revision:
            kwargs["revision"] = revision
        if quantization_config is not None:
            kwargs["quantization_config"] = quantization_config
        if device_map:
            kwargs["device_map"] = device_map if device_map in ("auto", "balanced", "sequential") else \
                {"": device_map}
        try:
            model = transformers.AutoModelForImageTextToText.from_pretrained(model_id, **kwargs)
            processor = transformers.AutoProcessor.from_pretrained(model_id, revision=revision)
        except (OSError, ValueError) as e:  # no such folder or repo, offline, not an image-text-to-text model
            first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
            raise UsageError(f"--model {model_id}: cannot load it ({first}). Pass a local model folder or a Hub id "
                             "(with HF_HUB_OFFLINE unset if it is not downloaded yet).") from e
    if device and not device_map and quantization_config is None:  # bitsandbytes places the model itself
        model.to(device)
    model.eval()
    return model, processor, model_id


def _check_out_folder(out: str) -> None:
    """An output folder must be a folder (or not exist yet): refused before anything runs."""
    path = Path(out)
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {out}: a file of that name exists; pass a folder (new or existing).")


def _check_quantization(quantization: str | None) -> None:
    """``--quantization 8bit|4bit`` loads through bitsandbytes: it must be importable, checked before any load."""
    if quantization in (None, "none"):
        return
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        raise UsageError(f"--quantization {quantization}: bitsandbytes is not installed; `pip install bitsandbytes` "
                         "or leave --quantization out.") from None


def _quantization_config(quantization: str | None) -> Any:
    if quantization in (None, "none"):
        return None
    import transformers

    if quantization == "8bit":
        return transformers.BitsAndBytesConfig(load_in_8bit=True)
    return transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype="float32")


def _check_device(device: str | None, option: str) -> None:
    """``--device cuda:0`` and the like: a device torch knows, and one this machine has."""
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise UsageError(f"{option} {device!r} is not a device; use cpu, cuda, cuda:0, mps ...") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"{option} {device}: this machine has no CUDA device; use cpu or leave {option} out.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(f"{option} {device}: this machine has {torch.cuda.device_count()} CUDA devices.")


# ----------------------------------------------------------------------------- commands


#: estimator settings that ``collect --like`` takes: CollectionConfig field -> where the estimator records it
#: (everything `eval` checks for compatibility, plus what the estimator's training data records).
LIKE_FIELDS = ("region_method", "k", "pooling", "feature_kind", "answer_effects", "method", "keep_prob")


def _like_settings(ref: str) -> tuple[dict, Any]:
    """The CollectionConfig settings an estimator (folder or Hub id) was trained on, and the estimator."""
    from ..estimator import LinearEstimator

    try:
        est = LinearEstimator.from_pretrained(ref)
    except AttributionError as e:
        raise UsageError(f"--like {ref}: {e}") from None
    data = est.training_data or {}
    k = (est.k_policy or {}).get("k") if isinstance(est.k_policy, dict) else None
    found = {"region_method": est.region_method, "k": k, "pooling": est.pooling,
             "feature_kind": getattr(est, "feature_kind", "attention"),
             "answer_effects": data.get("answer_effects"), "method": data.get("ablation_method"),
             "keep_prob": data.get("keep_prob")}
    return {name: value for name, value in found.items() if value is not None}, est


def _apply_like(args: argparse.Namespace) -> Any:
    """Fill the collect options from ``--like``; refuse explicit ones that contradict it. Returns the estimator."""
    if not args.like:
        return None
    settings, est = _like_settings(args.like)
    explicit = getattr(args, "_explicit", set())
    clashes = [f"--{name.replace('_', '-')} {getattr(args, name)} (the estimator has {value})"
               for name, value in settings.items() if name in explicit and getattr(args, name) != value]
    if clashes:
        raise UsageError(f"--like {args.like} contradicts {', '.join(clashes)}: an estimator is only evaluated on "
                         "a collection made like its training data. Leave those options out (--like sets them) or "
                         "drop --like.")
    from ..pipeline.collection import REGION_METHODS

    if settings.get("region_method") not in (None, *REGION_METHODS):
        raise UsageError(f"--like {args.like}: the estimator's regions were made with {settings['region_method']!r}, "
                         f"which collect cannot build (it builds {', '.join(REGION_METHODS)}).")
    for name, value in settings.items():
        setattr(args, name, value)
    return est


def _check_like_model(est: Any, model_or_config: Any, ref: str) -> None:
    from ..estimator import EstimatorMismatchError

    if est is None:
        return
    try:
        est.check_compatible(model_or_config)
    except EstimatorMismatchError as e:
        raise UsageError(f"--like {ref}: {e}") from None


def _dataset_spec(args: argparse.Namespace) -> DatasetSpec:
    """The one dataset the options name (toy, JSON lines or `datasets`), opened and checked."""
    chosen = [flag for flag, value in (("--toy", args.toy), ("--prompts", args.prompts), ("--dataset", args.dataset))
              if value is not None]
    if len(chosen) != 1:
        raise UsageError("collect needs exactly one dataset: --toy N, --prompts FILE.jsonl or --dataset NAME_OR_PATH"
                         + (f" (got {' and '.join(chosen)})." if chosen else "."))
    hf_only = [flag for flag, value in (("--dataset-config", args.dataset_config), ("--split", args.split),
                                        ("--image-column", args.image_column),
                                        ("--video-column", args.video_column), ("--fps", args.fps),
                                        ("--question-column", args.question_column), ("--id-column", args.id_column),
                                        ("--system-prompt", args.system_prompt)) if value is not None]
    if args.dataset is None and hf_only:
        raise UsageError(f"{', '.join(hf_only)} only go with --dataset.")
    if args.images_dir is not None and args.prompts is None:
        raise UsageError("--images-dir only goes with --prompts.")
    if args.images_dir is not None and not Path(args.images_dir).is_dir():
        raise UsageError(f"--images-dir {args.images_dir}: no such folder.")
    if args.toy is not None:
        return DatasetSpec("toy", n=int(args.toy), seed=int(args.toy_seed))
    if args.prompts is not None:
        return DatasetSpec("jsonl", path=str(Path(args.prompts).resolve()),
                           images_dir=str(Path(args.images_dir).resolve()) if args.images_dir else None)
    missing = [flag for flag, value in (("--split", args.split), ("--question-column", args.question_column))
               if value is None]
    if args.image_column is None and args.video_column is None:
        missing.append("--image-column or --video-column")
    if missing:
        raise UsageError(f"--dataset needs {', '.join(missing)} (e.g. --split train --image-column image "
                         "--question-column question).")
    if args.fps is not None and args.video_column is None:
        raise UsageError("--fps goes with --video-column (the frame rate of its videos).")
    from ..pipeline.datasets import hf_dataset_spec

    return hf_dataset_spec(args.dataset, args.split, args.image_column, args.question_column,
                           config=args.dataset_config, id_column=args.id_column, system_prompt=args.system_prompt,
                           video_column=args.video_column, fps=args.fps)


def cmd_collect(args: argparse.Namespace) -> int:
    from ..pipeline.collection import CollectionConfig, collect

    _check_out_folder(args.out)
    _check_device(args.device, "--device")
    _check_quantization(args.quantization)
    if args.device_map not in (None, "auto", "balanced", "sequential"):
        _check_device(args.device_map, "--device-map")
    if args.dataset is not None and args.model is None:
        raise UsageError("--dataset needs --model (a model id or local folder); the bundled toy model goes with --toy.")
    like = _apply_like(args)
    spec = _dataset_spec(args)  # a JSONL file is parsed and checked here; a `datasets` split is opened and checked
    from accelerate import PartialState

    state = PartialState()
    items = spec.items(limit=args.limit, shard=(state.process_index, state.num_processes))
    if spec.kind != "datasets":
        len(items)
    from ..pipeline.collection import check_dataset, check_settings

    # Before anything is loaded or written: every option (the config checks its fields' ranges and choices)
    # and a folder holding another dataset (a folder with no example in it holds nothing to protect).
    config = CollectionConfig(**{name: getattr(args, name) for name in COLLECT_OPTIONS})
    check_dataset(args.out, spec.to_dict())
    check_settings(args.out, config)
    if like is not None and args.model:  # the estimator's (L, H, model_type) against the model's config, unloaded
        import transformers

        try:
            model_config = transformers.AutoConfig.from_pretrained(args.model, revision=args.revision)
        except (OSError, ValueError):
            model_config = None  # _load_model says why it cannot be loaded
        if model_config is not None:
            _check_like_model(like, model_config, args.like)

    device_map = args.device_map
    device = None
    if device_map is None and state.num_processes > 1:
        device = str(state.device)  # one full model copy per process
    elif device_map is None and args.device:
        device = args.device
    model, processor, model_id = _load_model(args.model, toy=args.toy is not None, dtype=args.dtype,
                                             device_map=device_map, attn=args.attn_implementation,
                                             revision=args.revision, device=device, quantization=args.quantization)
    _check_like_model(like, model, args.like)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if state.is_main_process:
        (out / DATASET_FILE).write_text(json.dumps({**spec.to_dict(), "model": model_id,
                                                    "revision": args.revision}, indent=2) + "\n")
    # Every id of the whole dataset matters only when --limit stops early (the manifest's `complete`).
    dataset_ids = spec.ids() if args.limit is not None or spec.kind != "datasets" else None
    result = collect(model, processor, items, out, config, progress=not args.quiet, dataset=spec.to_dict(),
                     dataset_ids=dataset_ids)
    if state.is_main_process:
        print(f"collected {len(result['written'])} examples ({len(result['skipped'])} already on disk) into {out}")
        total = len(dataset_ids) if dataset_ids is not None else None
        if args.limit is not None and total is not None and args.limit < total:
            print(f"--limit {args.limit}: the dataset has {total} examples, so the collection is not complete; "
                  "rerun without --limit (or with a larger one) to collect the rest.")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from ..pipeline.collection import load_collection, read_manifest
    from ..pipeline.training import TrainingConfig, fit_estimator

    from ..pipeline.collection import check_ground_truth

    collection = Path(args.collection)
    _check_out_folder(args.out)
    records = load_collection(collection)
    if not records:
        raise UsageError(f"{collection} holds no examples; run `hf-vattr collect` first.")
    check_ground_truth(records, collection)
    try:
        manifest = read_manifest(collection)
    except FileNotFoundError:
        manifest = {}
    model_info = manifest.get("model", {})
    ccfg = manifest.get("config", {})
    dataset = read_dataset_spec(collection)
    base_model_id = args.base_model_id or (dataset.params.get("model") if dataset else None) or \
        model_info.get("name_or_path") or None
    target = args.target
    if target == "auto":  # both correlations when the collection has random subsets (the toy runs: best LDS and R^2)
        has_subsets = all(getattr(r, "subset_effects", None) is not None and r.subset_effects.numel() > 0
                          for r in records)
        target = "both" if has_subsets else "loo"
    config = TrainingConfig(**{**{name: getattr(args, name) for name in TRAIN_OPTIONS}, "target": target})
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
    inheritance = report.get("inheritance", {})
    if inheritance.get("applied"):
        print(f"answers inherit the thinking steps' scores: weight {inheritance['weight']:.3g} on their "
              f"{inheritance['pool']} (decay {inheritance['decay']:g}), own scores x {inheritance['own']:.3g}")
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
    from ..pipeline.baselines import make_method
    from ..pipeline.collection import check_ground_truth, load_collection
    from ..estimator import LinearEstimator
    from ..pipeline.evaluation import evaluate

    collection = Path(args.collection)
    names = _check_eval_args(args)
    records = load_collection(collection)
    if not records:
        raise UsageError(f"{collection} holds no examples.")
    check_ground_truth(records, collection)
    estimator = None
    if args.estimator:
        estimator = LinearEstimator.from_pretrained(args.estimator)
    records, split = _eval_split(args, records)
    if args.max_examples is not None:
        records = records[: args.max_examples]

    dataset = read_dataset_spec(collection)
    model = processor = None
    inputs_fn = None
    if args.model or (args.with_model and dataset is not None):
        model, processor, inputs_fn = _eval_model(args, collection, dataset, estimator)
    if not args.methods:  # the default list depends on whether a model was loaded
        names = _parse_methods(None, model is not None)
    methods = []
    for n in names:
        kwargs: dict[str, Any] = {}
        if n in ("integrated_gradients", "ig"):
            kwargs["steps"] = args.ig_steps
        if n == "random":
            kwargs["seed"] = args.seed
        if n == "estimator" and estimator is None:
            raise UsageError("method 'estimator' needs --estimator DIR.")
        methods.append(make_method(n, estimator=estimator, **kwargs))
    report = evaluate(methods, records, model, processor, ks=tuple(args.ks), topk=args.topk,
                      batch_size=args.batch_size, inputs_fn=inputs_fn, progress=not args.quiet,
                      auc_points=args.auc_points)
    report.info.update(split=split, collection=str(collection), estimator=args.estimator)
    if args.trajectories:
        _add_trajectories(report, dataset, records, estimator)
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


def _check_eval_args(args: argparse.Namespace) -> list[str]:
    """Refuse bad devices, quantization and method names before anything loads; returns the method names."""
    from ..pipeline.baselines import METHODS

    _check_device(args.device, "--device")
    _check_quantization(args.quantization)
    if args.device_map not in (None, "auto", "balanced", "sequential"):
        _check_device(args.device_map, "--device-map")
    known = ["estimator", *sorted(METHODS)]
    names = _parse_methods(args.methods, bool(args.model or args.with_model))
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise UsageError(f"--methods {args.methods!r}: unknown method{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(map(repr, unknown))}; choose from {', '.join(known)}." if unknown else
                         f"--methods {args.methods!r} names no method; choose from {', '.join(known)}.")
    if "estimator" in names and not args.estimator:
        raise UsageError("method 'estimator' needs --estimator DIR.")
    return names


def _eval_split(args: argparse.Namespace, records: list) -> tuple[list, str]:
    """``--split``: the estimator's held-out examples (from its training report) or all; returns them and the name."""
    split = args.split
    if split not in ("auto", "val"):
        return records, split
    report_path = Path(args.estimator) / TRAINING_REPORT if args.estimator and Path(args.estimator).is_dir() \
        else None
    val_ids = None
    if report_path is not None and report_path.exists():
        val_ids = set(json.loads(report_path.read_text()).get("split", {}).get("val") or [])
    if val_ids:
        return [r for r in records if str(r.example_id) in val_ids], "val"
    if split == "val":
        raise UsageError("--split val: the estimator folder has no training_report.json with held-out ids.")
    return records, "all"


def _eval_model(args: argparse.Namespace, collection: Path, dataset: DatasetSpec | None, estimator: Any
                ) -> tuple[Any, Any, Any]:
    """The model named by ``--model`` (or recorded by collect), its processor, and the prompt rebuilder for it."""
    import torch

    from ..pipeline.collection import _build_inputs

    model_id = args.model or (dataset.params.get("model") if dataset else None)
    toy = dataset is not None and dataset.kind == "toy" and model_id is None
    model, processor, _ = _load_model(model_id, toy=toy, dtype=args.dtype, device_map=args.device_map,
                                      attn=args.attn_implementation, device=args.device,
                                      quantization=args.quantization)
    if estimator is not None:
        estimator.check_compatible(model)
    if dataset is None:
        raise UsageError(f"{collection / DATASET_FILE} is missing, so the prompts cannot be rebuilt for the model; "
                         "evaluate without --model (stored ground truth only).")

    def inputs_fn(record):
        try:
            images, prompt = dataset.get(record.example_id)
        except KeyError:
            raise UsageError(f"example {record.example_id} is not in the dataset described by {DATASET_FILE}.") \
                from None
        inputs = _build_inputs(processor, images, prompt)
        ids = record.sequence[: record.prompt_len]
        if inputs["input_ids"].shape[-1] != record.prompt_len or not torch.equal(inputs["input_ids"][0], ids):
            raise UsageError(f"example {record.example_id}: rebuilt prompt differs from the collected one "
                             "(different processor or dataset?).")
        return inputs

    return model, processor, inputs_fn


def _add_trajectories(report: Any, dataset: DatasetSpec | None, records: list, estimator: Any) -> None:
    """``--trajectories``: trajectory statistics and failure AUC into ``report.info`` (needs correctness labels)."""
    import torch

    from ..pipeline.evaluation import trajectory_report

    labels = correctness_labels(dataset, records)
    if labels is None:
        logger.warning("--trajectories: no correctness labels (toy dataset or JSONL 'answer'); skipped.")
        return
    src = None
    if estimator is not None:
        src = [estimator.span_scores(torch.as_tensor(r.span_features), [sp.get("section") for sp in r.spans]).detach()
               for r in records]
    report.info["trajectories"] = trajectory_report([r for r in records], labels, scores=src)


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


def cmd_push(args: argparse.Namespace) -> int:
    from huggingface_hub.errors import HFValidationError, HfHubHTTPError, OfflineModeIsEnabled
    from huggingface_hub.utils import validate_repo_id

    from ..estimator import LinearEstimator

    try:  # before anything is read or sent
        validate_repo_id(args.repo_id)
    except HFValidationError as e:
        raise UsageError(f"{args.repo_id!r} is not a valid Hub repo id ({e}); use 'your-name/estimator-name'.") \
            from None
    if not Path(args.estimator).is_dir():
        raise UsageError(f"No estimator folder {args.estimator!r} exists (looked in {Path.cwd()}); pass the folder "
                         "written by `hf-vattr train`.")
    estimator = LinearEstimator.from_pretrained(args.estimator)
    try:
        url = estimator.push_to_hub(args.repo_id, private=args.private, token=args.token, branch=args.branch,
                                    commit_message=args.commit_message, model_card_kwargs={"repo_id": args.repo_id})
    except OfflineModeIsEnabled:
        raise UsageError("push needs the network, but offline mode is on (HF_HUB_OFFLINE=1): unset HF_HUB_OFFLINE "
                         "and run the command again.") from None
    except HFValidationError as e:
        raise UsageError(f"push to {args.repo_id!r} refused by huggingface_hub: {e}") from None
    except HfHubHTTPError as e:
        first = next((line.strip() for line in str(e).splitlines() if line.strip()), type(e).__name__)
        raise UsageError(f"push to {args.repo_id!r} failed: {first}. Check that you are logged in (`hf auth login`) "
                         "or pass --token with write access, and that the repo id is yours.") from None
    except OSError as e:  # no network (requests' ConnectionError is an OSError)
        raise UsageError(f"push to {args.repo_id!r} failed: the Hub could not be reached ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}). Check the network, then run it again.") \
            from None
    print(f"pushed {args.estimator} to {args.repo_id}: {url}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        demo = importlib.import_module("hf_vattr.commands.demo")  # honours sys.modules (tests swap the module)
    except ImportError as e:
        if getattr(e, "name", None) in ("hf_vattr.commands.demo", "demo") or "hf_vattr.commands.demo" in str(e):
            print("hf-vattr demo is not available in this version of hf_vattr (hf_vattr/demo.py is missing).",
                  file=sys.stderr)
            return 2
        raise
    result = demo.main(args)
    return int(result or 0)


def cmd_app(args: argparse.Namespace) -> int:
    """Serve the live web app: the bundled toy with a toy example preloaded, or --model with --estimator."""
    try:
        app = importlib.import_module("hf_vattr.commands.app")
        importlib.import_module("gradio")
    except ImportError as e:
        print(f"hf-vattr app needs Gradio: pip install \"hf_vattr[app]\" ({e})", file=sys.stderr)
        return 2
    from ..estimator import EstimatorMismatchError, LinearEstimator

    if args.regions is not None and args.regions not in app.REGION_METHODS:
        raise UsageError(f"--regions {args.regions!r} is not a region method; choose one of {app.REGION_METHODS}.")
    _check_device(args.device, "--device")
    _check_quantization(args.quantization)
    if args.device_map not in (None, "auto", "balanced", "sequential"):
        _check_device(args.device_map, "--device-map")
    toy = args.model is None
    model, processor, _ = _load_model(args.model, toy=toy, dtype=args.dtype, device_map=args.device_map,
                                      attn=args.attn_implementation, device=args.device,
                                      quantization=args.quantization)
    estimator_ref = args.estimator
    examples: list = []
    if toy:
        from .demo import HELD_OUT_SEED, toy_estimator_path
        from ..toy import make_examples

        estimator_ref = estimator_ref or str(toy_estimator_path())
        examples = [(ex.image, ex.question) for ex in make_examples(4, seed=HELD_OUT_SEED)]
    estimator = None
    if estimator_ref:
        try:
            estimator = LinearEstimator.from_pretrained(estimator_ref).check_compatible(model)
        except EstimatorMismatchError as err:
            raise UsageError(f"--estimator {estimator_ref}: {err}") from None
    regions = args.regions or ("vlm" if toy else "prefill")  # the toy estimator was trained on vlm regions, K=16
    print(f"hf-vattr app: serving on http://{args.host}:{args.port or 7860} (Ctrl-C stops)", flush=True)
    app.launch(model, processor, estimator, host=args.host, port=args.port, estimator_ref=estimator_ref or "",
               regions=regions, examples=examples, max_new_tokens=args.max_new_tokens,
               updates_per_second=args.updates_per_second, title="hf_vattr: live visual attribution"
               + (" (bundled toy model)" if toy else f" ({args.model})"))
    return 0


# ----------------------------------------------------------------------------- parser

#: CollectionConfig / TrainingConfig fields that are command-line options (the rest are Python-only:
#: hooks, dicts, devices and tuning knobs the CLI has never exposed).
COLLECT_OPTIONS = ("num_subsets", "keep_prob", "max_new_tokens", "region_method", "k", "pooling", "feature_kind",
                   "answer_effects", "batch_size", "seed", "method", "pixel_fill")
TRAIN_OPTIONS = ("epochs", "lr", "weight_decay", "nonnegative", "use_bias", "val_fraction", "seed", "target",
                 "optimizer", "calibrate", "batch_size", "inherit")

JSONL_HELP = """\
--prompts FILE.jsonl. {format}

"image" is one path, "images" a list of paths (relative ones are resolved against --images-dir when
given), "video" a video file or a list of frame paths (resolved the same way). "prompt" is the user's
question; "messages" instead gives a whole chat in the processor's format, with one {{"type": "image"}}
per image and one {{"type": "video"}} per video. A trace counts as correct when the text after
</think> contains "answer" (case-insensitively): the labels of `hf-vattr eval --trajectories`.

collect writes <out>/dataset.json, which records how to rebuild these examples, so that
`hf-vattr eval --with-model` can re-run the model on the same prompts."""


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (``hf-vattr collect: error: argument --batch-size: must be >= 1, got -1``), exit 2."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _ranged(parser: argparse.ArgumentParser, flag: str, kind: type, rng: str, help: str, **kwargs: Any) -> None:
    """An option whose values must lie in ``rng`` (interval notation): checked at parse time, shown in --help."""
    parser.add_argument(flag, type=argparse_type(kind, rng), help=f"{help}; {interval(rng).describe()}", **kwargs)


class _Explicit(argparse.Action):
    """Stores the value and records that the option was given (``collect --like`` refuses contradicting ones)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)
        explicit = set(getattr(namespace, "_explicit", set()))
        explicit.add(self.dest)
        setattr(namespace, "_explicit", explicit)


class _HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """Keeps the epilog's layout; shows defaults, except for flags and options whose default is None."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)


def add_config_options(parser: argparse.ArgumentParser, config_cls: type, names: Sequence[str],
                       **overrides: dict) -> None:
    """Add ``--field-name`` options for fields ``names`` of a config dataclass.

    Type, default, help, range and choices come from the field (``metadata={"help": ..., "range": "[1, inf)",
    "choices": ...}``; ``help`` and ``choices`` are the keys transformers' ``HfArgumentParser`` reads), so the
    CLI never restates them: the range is shown in the help and checked as the option is parsed, by the same
    metadata that :func:`hf_vattr.options.check_fields` checks in the config. We do not
    use ``HfArgumentParser`` itself because it adds every field (hooks and dicts too) and turns
    booleans into ``--flag [BOOL]``; here a ``False`` field becomes ``--flag``, a ``True`` one
    ``--no-flag``. ``overrides[name]`` replaces keyword arguments of one option.
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    for name in names:
        f = fields[name]
        kwargs: dict[str, Any] = {"default": f.default, "help": range_help(f)}
        if "choices" in f.metadata:
            kwargs["choices"] = list(f.metadata["choices"])
        kwargs.update(overrides.get(name, {}))
        flag = "--" + name.replace("_", "-")
        kind = next((t for t in typing.get_args(hints[name]) if t is not type(None)), hints[name])
        if kind is bool and kwargs["default"]:
            parser.add_argument(f"--no-{name.replace('_', '-')}", dest=name, action="store_false",
                                help=f"turn off: {kwargs['help']}")
        elif kind is bool:
            parser.add_argument(flag, action="store_true", help=kwargs["help"])
        else:
            parser.add_argument(flag, type=argparse_type(kind, f.metadata.get("range")), action=_Explicit, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    """The ``hf-vattr`` parser (imports the config modules, hence torch, to read their fields)."""
    parser = _Parser(prog="hf-vattr", description="Live, faithful visual attribution for VLMs: "
                                     "collect ground truth, train, evaluate and push estimators.")
    parser.add_argument("-v", "--verbose", action="store_true", help="info-level logging")
    sub = parser.add_subparsers(dest="command", metavar="{collect,train,eval,push,demo,app}")
    sub.required = True
    _add_collect_parser(sub)
    _add_train_parser(sub)
    _add_eval_parser(sub)
    _add_push_parser(sub)
    _add_demo_parser(sub)
    _add_app_parser(sub)
    return parser


def _subcommand(sub: Any, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    return sub.add_parser(name, formatter_class=_HelpFormatter, **kwargs)


def _add_model_args(p: argparse.ArgumentParser, model_help: str) -> None:
    p.add_argument("--model", help=model_help)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype to load --model in (auto: as saved)")
    p.add_argument("--device-map", default=None,
                   help="from_pretrained device_map: auto / balanced / sequential (big models), "
                        "or one device such as cuda:0")
    p.add_argument("--device", default=None, help="move the model to this device (when no --device-map)")
    p.add_argument("--quantization", default="none", choices=["none", "8bit", "4bit"],
                   help="load --model (or the toy) quantized with bitsandbytes (needs `pip install bitsandbytes`)")
    p.add_argument("--attn-implementation", default="sdpa", choices=["sdpa", "eager"],
                   help="attention kernel to load the model with (attribution does not need eager)")


def _add_collect_parser(sub: Any) -> None:
    """``hf-vattr collect``: options of the model, the dataset and CollectionConfig."""
    from ..pipeline.collection import PROMPTS_FORMAT, CollectionConfig

    c = _subcommand(sub, "collect", help="generate traces and record features + ablation ground truth",
                    description="Generate a trace per example; record its attention features and its ablation\n"
                                "ground truth (resumable; shards under `accelerate launch`).",
                    epilog=JSONL_HELP.format(format=PROMPTS_FORMAT))
    _add_model_args(c, "model id or local folder (with --toy, default: the bundled toy model)")
    c.add_argument("--revision", default=None, help="Hub revision (branch, tag or commit) of --model")
    _ranged(c, "--toy", int, "[1, inf)", "use N examples of the built-in toy task (instead of --prompts)",
            default=None, metavar="N")
    c.add_argument("--toy-seed", type=int, default=0, help="seed of the toy examples")
    c.add_argument("--prompts", default=None, metavar="FILE.jsonl",
                   help="JSON-lines dataset, one example per line (format below)")
    c.add_argument("--images-dir", default=None,
                   help="folder that relative image paths in --prompts are resolved against "
                        "(default: the JSONL file's folder)")
    c.add_argument("--dataset", default=None, metavar="NAME_OR_PATH",
                   help="a `datasets` dataset: Hub id, local folder of parquet / json / imagefolder files (streamed), "
                        "or a folder written by save_to_disk")
    c.add_argument("--dataset-config", default=None, metavar="NAME", help="configuration (subset) of --dataset")
    c.add_argument("--split", default=None, help="split of --dataset to collect (required with --dataset)")
    c.add_argument("--image-column", default=None, metavar="COL",
                   help="column of --dataset with the image(s): datasets.Image values, paths, bytes, or lists of them")
    c.add_argument("--video-column", default=None, metavar="COL",
                   help="column of --dataset with a video: a video file (a path or a datasets.Video value) or a list "
                        "of frames (as image cells hold them); it comes before the row's images in the prompt")
    _ranged(c, "--fps", float, "(0, inf)", "frame rate of --video-column's videos: files are sampled at it (default: "
            "every frame), frame lists were taken at it (default 2)", default=None)
    c.add_argument("--question-column", default=None, metavar="COL", help="column of --dataset with the question")
    c.add_argument("--id-column", default=None, metavar="COL",
                   help="column of --dataset with non-negative integer example ids (default: row numbers)")
    c.add_argument("--system-prompt", default=None, metavar="TEXT", help="system message before each question "
                   "of --dataset")
    c.add_argument("--like", default=None, metavar="ESTIMATOR",
                   help="estimator folder or Hub id: take its region method, K, pooling, feature kind, answer effects "
                        "(and ablation method / keep_prob when recorded), so the collection can evaluate it; "
                        "options that contradict it are refused")
    c.add_argument("--out", required=True, help="collection folder (rerun to resume)")
    _ranged(c, "--limit", int, "[1, inf)", "collect only the first N examples (the collection stays incomplete "
            "until the rest are collected)", default=None, metavar="N")
    add_config_options(c, CollectionConfig, COLLECT_OPTIONS)
    c.add_argument("--quiet", action="store_true", help="no progress bars")
    c.set_defaults(func=cmd_collect)


def _add_train_parser(sub: Any) -> None:
    """``hf-vattr train``: the collection, the output folder and TrainingConfig."""
    from ..pipeline.training import TARGETS, TrainingConfig

    t = _subcommand(sub, "train", help="fit a LinearEstimator on a collection",
                    description="Fit a LinearEstimator on a collection (negative-Pearson loss, examples held out\n"
                                "for validation); writes the estimator and training_report.json.")
    t.add_argument("collection", help="collection folder written by `hf-vattr collect`")
    t.add_argument("--out", required=True, help="estimator folder (config.json, model.safetensors, README.md)")
    add_config_options(t, TrainingConfig, TRAIN_OPTIONS, target={
        "default": "auto", "choices": ["auto", *TARGETS],
        "help": TrainingConfig.__dataclass_fields__["target"].metadata["help"]
        + "; auto: both when the collection has random subsets, else loo"})
    t.add_argument("--base-model-id", default=None,
                   help="model id recorded in the estimator (default: the model `collect` used)")
    t.add_argument("--base-model-revision", default=None,
                   help="revision of that model (default: the one `collect` used)")
    t.add_argument("--quiet", action="store_true", help="no progress bars")
    t.set_defaults(func=cmd_train)


def _add_eval_parser(sub: Any) -> None:
    """``hf-vattr eval``: the collection, the estimator, the model and the metrics."""
    e = _subcommand(sub, "eval", help="compare the estimator with baselines; prints a markdown table, writes JSON",
                    description="Score the estimator and baselines against the collection's ablation ground\n"
                                "truth (LDS, top-K drop, R^2); print a markdown table and write a JSON report.")
    e.add_argument("collection", help="collection folder written by `hf-vattr collect`")
    e.add_argument("--estimator", default=None, help="estimator folder or Hub id")
    _add_model_args(e, "model id or local folder to load, for the baselines that re-run it (leave-one-out, "
                  "gradients) and measured top-K drops (see also --with-model)")
    e.add_argument("--with-model", action="store_true",
                   help="load the model recorded by collect (dataset.json) without naming it")
    e.add_argument("--methods", default=None, help="comma list: estimator, raw_attention, leave_one_out, "
                   "grad_x_input, integrated_gradients, random (default: all that can run)")
    e.add_argument("--split", default="auto", choices=["auto", "val", "all"],
                   help="auto: the estimator's held-out examples when known, else all")
    _ranged(e, "--max-examples", int, "[1, inf)", "evaluate only the first N examples (after --split)",
            default=None, metavar="N")
    _ranged(e, "--ks", int, "[1, inf)", "top-K drop sizes: log-prob drop when a method's K top regions are "
            "ablated together", nargs="+", default=[1, 3, 5], metavar="K")
    e.add_argument("--topk", default="auto", choices=["auto", "measure", "table"],
                   help="top-K drops: measure (ablate with the model), table (from the collected ground truth), "
                        "auto (measure when a model is loaded)")
    _ranged(e, "--auc-points", int, "[0, inf)", "deletion / insertion AUC: steps along each curve (round(i*K/N) "
            "regions, i = 0..N; N >= K: every region), measured with real ablations with the top-K drops; 0: skip",
            default=8, metavar="N")
    _ranged(e, "--ig-steps", int, "[1, inf)", "integrated-gradients interpolation steps", default=16)
    _ranged(e, "--batch-size", int, "[1, inf)", "ablation masks per forward pass", default=16)
    e.add_argument("--seed", type=int, default=0, help="seed of the random baseline")
    e.add_argument("--trajectories", action="store_true", help="add trajectory stats and failure AUC (needs labels)")
    e.add_argument("--json", default=None,
                   help=f"where to write the JSON report (default <estimator>/{DEFAULT_EVAL_JSON}, "
                        "or <collection>/ without a local estimator)")
    e.add_argument("--quiet", action="store_true", help="no progress bars")
    e.set_defaults(func=cmd_eval)


def _add_push_parser(sub: Any) -> None:
    """``hf-vattr push``: an estimator folder to a Hub repository."""
    p = _subcommand(sub, "push", help="upload an estimator folder to the Hub",
                    description="Upload an estimator folder (weights, config, model card) to a Hub repository.")
    p.add_argument("estimator", help="estimator folder written by `hf-vattr train`")
    p.add_argument("repo_id", help="Hub repository, e.g. your-name/qwen3-vl-8b-vattr (created if missing)")
    p.add_argument("--private", action="store_true", default=None, help="create the repository as private")
    p.add_argument("--token", default=None, help="Hub token (default: the saved login)")
    p.add_argument("--branch", default=None, help="branch to push to (default: the main branch)")
    p.add_argument("--commit-message", default="Push hf_vattr LinearEstimator", help="commit message")
    p.set_defaults(func=cmd_push)


def _add_demo_parser(sub: Any) -> None:
    """``hf-vattr demo``: everything after it is the demo's own (parsed by hf_vattr.commands.demo.main from
    args.demo_args)."""
    d = sub.add_parser("demo", help="stream attributions from the bundled toy model and write an HTML report "
                                    "(`hf-vattr demo --help` lists its options)", add_help=False)
    d.set_defaults(func=cmd_demo, demo_args=[])


def _add_app_parser(sub: Any) -> None:
    """``hf-vattr app``: the model, the estimator, the regions and the server."""
    a = _subcommand(sub, "app", help="serve the live web app (Gradio; pip install \"hf_vattr[app]\")",
                    description="Serve a web page that streams the reasoning and, per step, the image regions it\n"
                                "relies on. No arguments: the bundled toy model, offline, a toy example preloaded.")
    _add_model_args(a, "model id or local folder (default: the bundled toy model)")
    a.add_argument("--estimator", default=None, help="estimator folder or Hub id (default with the toy: its own)")
    a.add_argument("--regions", default=None,
                   help="region method: prefill, vlm, grid, color, slic, dinov3, dinov2, auto "
                        "(default: vlm for the toy, prefill otherwise)")
    _ranged(a, "--max-new-tokens", int, "[1, 32768]", "default generation budget on the page", default=1024)
    _ranged(a, "--updates-per-second", float, "(0, 1000]",
            "most overlay updates per second while tokens arrive (decoding never waits)", default=4.0)
    a.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    _ranged(a, "--port", int, "[1, 65535]", "port (default: Gradio's, 7860 or the next free one)", default=None)
    a.set_defaults(func=cmd_app)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if args.command == "demo":
        args.demo_args = list(extra)
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if args.verbose:
        logging.set_verbosity_info()
    try:
        return int(args.func(args) or 0)
    except AttributionError as err:  # a user mistake (or a refused input): one line, no traceback
        _print_error(args.command, str(err))
        return 2
    except SystemExit as err:
        if isinstance(err.code, str):  # SystemExit("message") from a library caller
            _print_error(args.command, err.code)
            return 2
        raise


def _print_error(command: str, message: str) -> None:
    """``hf-vattr <command>: error: <message>`` on one line of stderr."""
    text = " ".join(line.strip() for line in str(message).splitlines() if line.strip())
    print(f"hf-vattr {command}: error: {text}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
