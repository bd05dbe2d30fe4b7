"""estimator=None: the best untrained score (value-norm attention, mean over layers and heads), labelled
"uncalibrated" wherever scores are shown: events, the trace (saved and loaded), the summary, the HTML table and
report, the overlays' colour bar, the notebook view and the app."""

from __future__ import annotations

import pytest
import torch

from hf_vattr import AttributionStreamer, LinearEstimator, SpanAttribution, TokenAttribution
from hf_vattr.streaming.events import AttributionTrace
from hf_vattr.toy import load_toy_model, make_examples, prompt_messages, toy_estimator_path, toy_regions
from hf_vattr.viz import SCORE_UNITS, UNCALIBRATED_UNITS, render_html, score_units, trace_table_html

_RUNS: dict = {}


def _run(with_estimator: bool):
    if with_estimator not in _RUNS:
        model, processor = load_toy_model()
        estimator = LinearEstimator.from_pretrained(toy_estimator_path())
        example = make_examples(1, seed=7)[0]
        prompt = processor.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=False)
        inputs = processor(text=[prompt], images=[example.image], return_tensors="pt")
        regions = toy_regions(model, inputs, [example.image], estimator)
        streamer = AttributionStreamer(model, processor, estimator=estimator if with_estimator else None,
                                       images=[example.image], regions=regions, keep_features=True)
        events = list(streamer.generate(**inputs, max_new_tokens=96))
        _RUNS[with_estimator] = (streamer, events, regions, model, inputs)
    return _RUNS[with_estimator]


def test_no_estimator_streams_value_norm_attention_labelled_uncalibrated():
    streamer, events, *_ = _run(False)
    assert streamer.session.feature_kind == "value_norm"
    tokens = [e for e in events if isinstance(e, TokenAttribution)]
    spans = [e for e in events if isinstance(e, SpanAttribution)]
    assert tokens and spans
    assert all(e.uncalibrated and not e.calibrated for e in events)
    assert streamer.trace.uncalibrated
    for t in tokens:  # the score is the mean over layers and heads of the value-norm features
        torch.testing.assert_close(t.region_scores, t.features.mean(dim=(0, 1)))
    # ... which are the value-norm features an estimator of that kind sees, not plain attention
    with_estimator, est_events, *_ = _run(True)
    est_tokens = [e for e in est_events if isinstance(e, TokenAttribution)]
    assert with_estimator.session.feature_kind == "value_norm"
    torch.testing.assert_close(torch.stack([t.features for t in tokens]), torch.stack([t.features for t in est_tokens]))
    assert all(e.calibrated and not e.uncalibrated for e in est_events) and with_estimator.trace.calibrated


def test_uncalibrated_label_survives_save_and_load(tmp_path):
    streamer, *_ = _run(False)
    folder = streamer.trace.save(tmp_path / "raw")
    assert '"calibrated": false' in (folder / "trace.json").read_text()
    loaded = AttributionTrace.load(folder)
    assert loaded.uncalibrated and all(not e.calibrated for e in (*loaded.tokens, *loaded.spans))
    calibrated, *_ = _run(True)
    folder = calibrated.trace.save(tmp_path / "est")
    assert "calibrated" not in (folder / "trace.json").read_text()  # calibrated traces keep their bytes
    assert AttributionTrace.load(folder).calibrated


def test_summary_table_report_and_colour_bar_say_uncalibrated():
    raw, *_ = _run(False)
    est, *_ = _run(True)
    assert "uncalibrated" in raw.trace.summary().splitlines()[0]
    assert "uncalibrated" not in est.trace.summary()
    assert score_units(raw.trace) == UNCALIBRATED_UNITS and score_units(est.trace) == SCORE_UNITS
    table = trace_table_html(raw.trace)
    assert "data-calibrated='false'" in table and "top regions (uncalibrated score)" in table
    assert "uncalibrated" not in trace_table_html(est.trace)
    page = render_html(raw.trace, question="q")
    assert "data-calibrated='false'" in page and UNCALIBRATED_UNITS in page
    assert "uncalibrated" not in render_html(est.trace, question="q")


def test_notebook_view_says_uncalibrated():
    pytest.importorskip("IPython")
    from IPython.core.displaypub import CapturingDisplayPublisher
    from IPython.core.interactiveshell import InteractiveShell

    from hf_vattr.streaming.notebook import LiveView

    InteractiveShell.clear_instance()
    shell = InteractiveShell.instance()
    shell.display_pub = CapturingDisplayPublisher()
    try:
        raw, *_ = _run(False)
        view = LiveView(raw.trace, interval=0.0)
        view.update(force=True, done=True)
        assert "uncalibrated" in view._current_html(done=True) and "data-calibrated='false'" in view._table_html()
        est, *_ = _run(True)
        view = LiveView(est.trace, interval=0.0)
        assert "uncalibrated" not in view._current_html(done=False) + view._table_html()
    finally:
        InteractiveShell.clear_instance()


def test_app_frames_say_uncalibrated():
    from hf_vattr.commands.app import Frame, _Live, _overlay_html, _top_html, step_picture

    raw, _, regions, *_ = _run(False)
    trace = raw.trace
    picture = step_picture(trace, trace.images, trace.spans[0].region_scores, caption="step 1")
    frame = Frame(text=trace.text, steps=[], tokens=len(trace.tokens), overlay=picture, overlay_step=0,
                  top=[(1, "top-left", 0.1)], calibrated=False)
    assert "(uncalibrated)" in _overlay_html(frame) and "0.1 uncalibrated" in _top_html(frame)
    frame.calibrated = True
    assert "uncalibrated" not in _overlay_html(frame) + _top_html(frame)

    class FakeGradio:
        @staticmethod
        def skip():
            return None

    live = _Live()
    live.trace = trace
    from hf_vattr.commands.app import LiveApp

    status = LiveApp._frame_outputs(None, FakeGradio, frame, live)[0]
    assert "uncalibrated" in status and not frame.calibrated
