"""Indirect effects: answers measured with the reasoning regenerated, and scored through the steps before them.

References are independent of the code under test: total effects against a batch-of-one
regeneration scored by the slow full-forward route; inheritance against the formula written
out here; streamed answers against the same estimator applied to collected span features.
"""

from __future__ import annotations

import json

import pytest
import torch

from hf_vattr import AttributionStreamer, LinearEstimator, SpanAttribution
from hf_vattr.pipeline.ablation import _Knockout, span_logprobs_naive
from hf_vattr.capture import attention_intervention
from hf_vattr.pipeline.collection import CollectionConfig, _build_inputs, collect_example
from hf_vattr.pipeline.datasets import DatasetSpec
from hf_vattr.toy import toy_estimator_path
from hf_vattr.estimator import EstimatorConfigError
from hf_vattr.pipeline.training import TrainingConfig, fit_estimator, synthetic_examples

CONFIG = CollectionConfig(region_method="vlm", k=16, max_new_tokens=64, num_subsets=4, answer_effects="total")
SPEC = DatasetSpec("toy", n=10, seed=7002)


@pytest.fixture(scope="module")
def toy():
    from hf_vattr.toy import load_toy_model

    model, processor = load_toy_model()
    return model, processor


@pytest.fixture(scope="module")
def total_record(toy):
    model, processor = toy
    images, prompt = SPEC.get(0)  # its black object's region changes the reasoning when ablated
    return collect_example(model, processor, images, prompt, CONFIG, example_id=0)


def _reference_total_effect(model, processor, record, mask: torch.Tensor, items=None, prompt=None,
                            config=CONFIG) -> tuple[float, bool]:
    """Batch of one: regenerate the reasoning under the mask, append the original answer, score it by full forwards."""
    if items is None:
        items, prompt = SPEC.get(record.example_id)
    inputs = _build_inputs(processor, items, prompt)
    close_id = processor.tokenizer.convert_tokens_to_ids("</think>")
    p = record.prompt_len
    generated = record.sequence[p:].tolist()
    close = generated.index(close_id) + 1
    answer = next(i for i, sp in enumerate(record.spans) if sp["section"] == "answer")
    start, end = record.spans[answer]["start"], record.spans[answer]["end"]
    regions = record.prompt_regions()
    key_ablated = torch.zeros(1, p + config.max_new_tokens, dtype=torch.bool)
    key_ablated[0, regions.layout.positions] = (mask.float() @ regions.token_masks().float()) > 0
    with torch.no_grad(), attention_intervention(model, _Knockout(key_ablated)):
        out = model.generate(**inputs, max_new_tokens=config.max_new_tokens, do_sample=False, eos_token_id=[close_id],
                             pad_token_id=close_id)[0, p:].tolist()
    new = out[: out.index(close_id) + 1] if close_id in out else out + [close_id]
    shift = len(new) - close
    seq = torch.tensor(record.sequence[:p].tolist() + new + generated[close:])[None]
    ablated = span_logprobs_naive(model, inputs, seq, [(start + shift, end + shift)], mask[None], regions)
    original = span_logprobs_naive(model, inputs, record.sequence[None], [(start, end)],
                                   torch.zeros(1, regions.num_regions, dtype=torch.bool), regions)
    return float(original[0, 0] - ablated[0, 0]), new != generated[:close]


def _assert_total_effects_match_regeneration(model, processor, record, items=None, prompt=None, config=CONFIG):
    """Every mask's recorded answer effect (single regions, then subsets) equals the batch-of-one reference."""
    answer = next(i for i, sp in enumerate(record.spans) if sp["section"] == "answer")
    masks = list(torch.eye(record.num_regions, dtype=torch.bool)) + list(record.subset_masks)
    measured = torch.cat([record.loo_effects[answer], record.subset_effects[answer]])
    changed = 0
    for m, mask in enumerate(masks):
        reference, regenerated_differently = _reference_total_effect(model, processor, record, mask, items, prompt,
                                                                     config)
        changed += regenerated_differently
        assert measured[m].item() == pytest.approx(reference, abs=2e-3), (m, measured[m].item(), reference)
    assert changed >= 1  # the example exercises the regenerated path, not only the teacher-forced shortcut
    assert record.config["answer_effects"] == "total"


@pytest.mark.slow
def test_total_answer_effects_equal_a_batch_of_one_regeneration_scored_by_full_forwards(toy, total_record):
    model, processor = toy
    _assert_total_effects_match_regeneration(model, processor, total_record)


@pytest.mark.slow
def test_total_answer_effects_on_a_video_equal_a_regeneration_scored_by_full_forwards():
    """The same reference on the toy video model: a clip's regions span frame groups, the reasoning names objects
    at times, and the answer (motion or order) depends on the clip through those steps."""
    from hf_vattr.pipeline.collection import DecodedVideo
    from hf_vattr.toy import load_toy_model
    from hf_vattr.toy.video_task import make_video_example, video_prompt_messages

    model, processor = load_toy_model(task="video")
    config = CollectionConfig(region_method="grid", k=4, max_new_tokens=96, num_subsets=3, answer_effects="total")
    clip = make_video_example(11, n_frames=4)
    items, prompt = [DecodedVideo(clip.frames, clip.video_metadata, "toy clip")], video_prompt_messages(clip)
    record = collect_example(model, processor, items, prompt, config)
    assert record.prompt_regions().layout.images[0].kind == "video" and record.num_regions == 4 * 2  # 2 groups
    _assert_total_effects_match_regeneration(model, processor, record, items, prompt, config)


@pytest.mark.slow
def test_thinking_spans_keep_their_teacher_forced_effects(toy, total_record):
    model, processor = toy
    images, prompt = SPEC.get(0)
    direct = collect_example(model, processor, images, prompt, CollectionConfig(**{**CONFIG.to_dict(),
                                                                                  "answer_effects": "direct"}))
    thinking = [i for i, sp in enumerate(direct.spans) if sp["section"] == "thinking"]
    assert torch.equal(direct.loo_effects[thinking], total_record.loo_effects[thinking])
    answer = [i for i, sp in enumerate(direct.spans) if sp["section"] == "answer"]
    # teacher forcing hides the path through the reasoning: the direct answer effects are (near) zero
    assert direct.loo_effects[answer].abs().max() < total_record.loo_effects[answer].abs().max()


def test_total_effects_need_attention_ablation(toy):
    model, processor = toy
    images, prompt = SPEC.get(0)
    with pytest.raises(ValueError, match="method='attention'"):
        collect_example(model, processor, images, prompt, CollectionConfig(answer_effects="total", method="pixel"))
    with pytest.raises(ValueError, match="answer_effects"):
        collect_example(model, processor, images, prompt, CollectionConfig(answer_effects="both"))


# ----------------------------------------------------------------------------- estimator


def _expected_inherited(steps: torch.Tensor, weight: float, decay: float, bias: float) -> torch.Tensor:
    n = steps.shape[0]
    c = torch.tensor([decay ** (n - 1 - i) for i in range(n)], dtype=torch.float64)
    c = c / c.sum()
    return weight * ((steps.double() - bias).clamp_min(0) * c[:, None]).sum(0)


def test_span_scores_add_the_recency_weighted_steps_to_answers_only():
    est = LinearEstimator(2, 3, use_bias=True, inherit_weight=1.5, inherit_decay=0.5)
    with torch.no_grad():
        est.weight.normal_()
        est.bias.fill_(0.25)
    feats = torch.rand(5, 2, 3, 7)
    sections = ["thinking", "thinking", "answer", "thinking", "answer"]
    own = est(feats).detach()
    got = est.span_scores(feats, sections).detach()
    assert torch.equal(got[[0, 1, 3]], own[[0, 1, 3]])
    torch.testing.assert_close(got[2].double(), own[2].double() + _expected_inherited(own[:2], 1.5, 0.5, 0.25))
    torch.testing.assert_close(got[4].double(), own[4].double() + _expected_inherited(own[[0, 1, 3]], 1.5, 0.5, 0.25))
    # decay 0: the last step only; no step before: nothing inherited
    est.set_inheritance(2.0, 0.0)
    got = est.span_scores(feats[[2, 0, 1, 4]], ["answer", "thinking", "thinking", "answer"]).detach()
    own = est(feats[[2, 0, 1, 4]]).detach()
    torch.testing.assert_close(got[0], own[0])
    torch.testing.assert_close(got[3], own[3] + 2.0 * (own[2] - 0.25).clamp_min(0))
    # max pool, with the answer's own score weighted
    est.set_inheritance(0.5, 1.0, own=0.25, pool="max")
    got = est.span_scores(feats, sections).detach()
    own = est(feats).detach()
    want = 0.25 + 0.25 * (own[4] - 0.25) + 0.5 * (own[[0, 1, 3]] - 0.25).clamp_min(0).max(0).values
    torch.testing.assert_close(got[4], want)


def test_inheritance_is_saved_checked_and_omitted_at_its_defaults(tmp_path):
    est = LinearEstimator(2, 2, inherit_weight=0.75, inherit_decay=0.3)
    est.save_pretrained(tmp_path / "on")
    LinearEstimator(2, 2, inherit_weight=0.5).save_pretrained(tmp_path / "default-decay")  # card renders
    assert "weight 0.5, mean, decay 1, own 1" in (tmp_path / "default-decay" / "README.md").read_text()
    loaded = LinearEstimator.from_pretrained(str(tmp_path / "on"))
    assert (loaded.inherit_weight, loaded.inherit_decay) == (0.75, 0.3)
    LinearEstimator(2, 2).save_pretrained(tmp_path / "off")
    config = json.loads((tmp_path / "off" / "config.json").read_text())
    assert "inherit_weight" not in config and "inherit_decay" not in config  # older files keep their bytes
    for bad in ({"inherit_weight": -1.0}, {"inherit_decay": 1.5}, {"inherit_weight": float("nan")},
                {"inherit_decay": True}, {"inherit_pool": "median"}):
        with pytest.raises(EstimatorConfigError, match="inherit_"):
            LinearEstimator(2, 2, **bad)


@pytest.mark.slow
def test_training_recovers_a_planted_inheritance():
    records, _ = synthetic_examples(num_examples=60, spans=(3, 5), noise=0.02, seed=3,
                                    weight=torch.rand(3, 4, generator=torch.Generator().manual_seed(3)) + 0.1)
    for r in records:  # the last span is the answer; its total effect is the mean of the steps' effects
        r.spans[-1]["section"] = "answer"
        r.loo_effects[-1] = r.loo_effects[:-1].mean(0)
        r.subset_effects[-1] = r.subset_effects[:-1].mean(0)
        r.config["answer_effects"] = "total"
    est, report = fit_estimator(records, config=TrainingConfig(target="both", epochs=150))
    assert report["inheritance"]["applied"] and (est.inherit_pool, est.inherit_decay) == ("mean", 1.0)
    assert est.inherit_weight == pytest.approx(1.0, abs=0.15)
    off, _ = fit_estimator(records, config=TrainingConfig(target="both", epochs=150, inherit="off"))
    answers = [(r, len(r.spans) - 1) for r in records]

    def answer_pearson(e):
        values = []
        for r, a in answers:
            pred = e.span_scores(r.span_features, [sp["section"] for sp in r.spans])[a].detach()
            values.append(torch.corrcoef(torch.stack([pred, r.loo_effects[a]]))[0, 1].item())
        return sum(values) / len(values)

    assert answer_pearson(est) > 0.95 > answer_pearson(off) + 0.1


# ----------------------------------------------------------------------------- streaming


def test_streamed_answers_inherit_exactly_what_span_scores_gives_on_collected_features(toy, consume):
    model, processor = toy
    estimator = LinearEstimator.from_pretrained(str(toy_estimator_path()))
    estimator.set_inheritance(0.9, 0.5)
    images, prompt = SPEC.get(1)
    record = collect_example(model, processor, images, prompt,
                             CollectionConfig(region_method="vlm", k=16, max_new_tokens=64, num_subsets=0,
                                              feature_kind=estimator.feature_kind))
    inputs = _build_inputs(processor, images, prompt)
    streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=estimator, images=images,
                                   regions=record.prompt_regions(), timeout=60)
    events, error = consume(streamer.generate(**inputs, max_new_tokens=64, do_sample=False), deadline=60)
    assert error is None, error
    spans = [e for e in events if isinstance(e, SpanAttribution)]
    assert [s.section for s in spans] == [sp["section"] for sp in record.spans]
    assert "answer" in [s.section for s in spans]
    expected = estimator.span_scores(record.span_features, [sp["section"] for sp in record.spans]).detach()
    for span, want in zip(spans, expected):
        torch.testing.assert_close(span.region_scores, want, atol=1e-4, rtol=1e-4)
    answer = next(s for s in spans if s.section == "answer")
    own = estimator(record.span_features).detach()[-1]
    assert not torch.allclose(answer.region_scores, own, atol=1e-3)  # the inherited part is really there


@pytest.mark.slow
def test_evaluation_measures_answer_topk_drops_with_the_reasoning_regenerated(toy, total_record):
    from hf_vattr.pipeline.baselines import make_method
    from hf_vattr.pipeline.evaluation import evaluate

    model, processor = toy
    record = total_record
    ev = evaluate([make_method("leave_one_out")], [record], model, processor, keep_scores=True, auc_points=0,
                  inputs_fn=lambda r: _build_inputs(processor, *SPEC.get(int(r.example_id))))
    answer = next(i for i, sp in enumerate(record.spans) if sp["section"] == "answer")
    top1 = ev.per_span["leave_one_out"]["top1_drop"][answer]
    # leave-one-out's top region is the one with the largest stored total effect; ablating it for real,
    # with the reasoning regenerated, must give that same effect (teacher forcing would give ~0)
    assert top1 == pytest.approx(float(record.loo_effects[answer].max()), abs=2e-3)
    assert float(record.loo_effects[answer].max()) > 1.0
