"""The notebook view: rich display of a trace, and hf_vattr.streaming.notebook.live updating display handles in place
(driven through IPython's own display machinery, with a capturing display publisher)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("IPython")

from IPython.core.displaypub import CapturingDisplayPublisher  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

from hf_vattr.streaming.events import AttributionTrace, SpanAttribution, TokenAttribution  # noqa: E402
from hf_vattr.streaming.notebook import LiveView, live  # noqa: E402

from test_viz import regions_for, three_by_three, toy_image  # noqa: E402


@pytest.fixture
def shell():
    """An IPython shell whose display publisher records every display and update."""
    InteractiveShell.clear_instance()
    sh = InteractiveShell.instance()
    sh.display_pub = CapturingDisplayPublisher()
    yield sh
    InteractiveShell.clear_instance()


class FakeStreamer:
    """Yields token and span events, appending them to its trace first, as AttributionStreamer's worker does."""

    def __init__(self, n_steps: int = 4, tokens_per_step: int = 5, clock=None) -> None:
        regions = regions_for(three_by_three())
        self.traces = [AttributionTrace(regions, images=[toy_image()])]
        self.n_steps, self.per_step, self.clock = n_steps, tokens_per_step, clock

    def __iter__(self):
        trace = self.traces[0]
        for step in range(self.n_steps):
            start = len(trace.tokens)
            for j in range(self.per_step):
                scores = torch.zeros(9)
                scores[step % 9] = 5.0 + j
                token = TokenAttribution(len(trace.tokens), 7, f"w{step}.{j} ", scores,
                                         "answer" if step == self.n_steps - 1 else "thinking")
                trace.tokens.append(token)
                if self.clock is not None:
                    self.clock.now += 0.01
                yield token
            scores = torch.stack([t.region_scores for t in trace.tokens[start:]]).mean(0)
            span = SpanAttribution(step, f"step text {step}", (start, len(trace.tokens)), scores, token.section)
            trace.spans.append(span)
            yield span


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_live_updates_two_display_handles_in_place(shell):
    streamer = FakeStreamer()
    trace = live(streamer, interval=0.0)
    assert trace is streamer.traces[0]
    outputs = shell.display_pub.outputs
    created = [o for o in outputs if not o["update"]]
    assert len(created) == 2  # the current view and the step table: displayed once each
    ids = [o["transient"]["display_id"] for o in created]
    updates = [o for o in outputs if o["update"]]
    assert updates and {o["transient"]["display_id"] for o in updates} <= set(ids)
    final_current = [o for o in updates if o["transient"]["display_id"] == ids[0]][-1]["data"]["text/html"]
    final_table = [o for o in updates if o["transient"]["display_id"] == ids[1]][-1]["data"]["text/html"]
    assert final_current.startswith("<div class='vattr-live'>") and "done: 20 tokens, 4 finished steps" in final_current
    assert "reasoning path" in final_current  # the trajectory plot replaces the step overlay at the end
    assert all(f"step text {i}" in final_table for i in range(4))
    assert final_table.count("<tr class=") == 4 and "indirect</span>" in final_table


def test_live_throttles_updates(shell):
    clock = Clock()
    streamer = FakeStreamer(n_steps=5, tokens_per_step=20, clock=clock)
    view_holder = {}
    original_init = LiveView.__init__

    def init(self, *args, **kwargs):  # the same view, on the fake clock
        original_init(self, *args, **{**kwargs, "clock": clock})
        view_holder["view"] = self

    LiveView.__init__ = init
    try:
        live(streamer, interval=0.25)
    finally:
        LiveView.__init__ = original_init
    view = view_holder["view"]
    events = 5 * 20 + 5
    # 1.0 s of fake time at one update per 0.25 s, plus the first and the final one; never one per event
    assert 3 <= view.updates <= 7 < events
    assert len([o for o in shell.display_pub.outputs if o["update"]]) >= view.updates


def test_live_skips_other_sequences_of_a_batch(shell):
    streamer = FakeStreamer(n_steps=2)
    other = AttributionTrace(streamer.traces[0].regions, sequence=1)
    streamer.traces.append(other)
    trace = live(streamer, sequence=1, interval=0.0)
    assert trace is other and trace.spans == []
    created = [o for o in shell.display_pub.outputs if not o["update"]]
    assert "finished steps appear here" in created[1]["data"]["text/html"]


def test_live_reraises_a_generation_error_after_drawing_what_came(shell):
    class Failing(FakeStreamer):
        def __iter__(self):
            for i, event in enumerate(super().__iter__()):
                if i == 8:
                    raise RuntimeError("generate raised in its thread")
                yield event

    streamer = Failing()
    with pytest.raises(RuntimeError, match="generate raised"):
        live(streamer, interval=10.0)
    last = [o for o in shell.display_pub.outputs if o["update"]][-2]["data"]["text/html"]
    assert "done: 8 tokens, 1 finished steps" in last


def test_show_displays_html_in_a_kernel_and_prints_elsewhere(shell, capsys):
    streamer = FakeStreamer(n_steps=2)
    list(streamer)
    trace = streamer.traces[0]
    trace.show()  # a terminal IPython: no kernel -> a text table
    printed = capsys.readouterr().out
    assert "[0] thinking grounded 'step text 0'" in printed and "indirect" in printed
    shell.kernel = object()  # what ipykernel's shell has
    try:
        trace.show()
    finally:
        del shell.kernel
    data = [o["data"] for o in shell.display_pub.outputs]
    assert "step text 1" in data[0]["text/html"] and "image/png" in data[1]
    assert trace._repr_html_().count("<tr class=") == 2


@pytest.mark.slow
def test_live_on_the_toy_model_returns_the_streamed_trace(shell):
    from hf_vattr import AttributionStreamer, LinearEstimator
    from hf_vattr.toy import toy_estimator_path, toy_regions
    from hf_vattr.toy import load_toy_model, make_examples, prompt_messages

    model, processor = load_toy_model()
    estimator = LinearEstimator.from_pretrained(str(toy_estimator_path()))
    example = make_examples(1, seed=20261125)[0]
    prompt = processor.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[example.image], return_tensors="pt")
    plain = model.generate(**inputs, max_new_tokens=96, do_sample=False)
    streamer = AttributionStreamer(model, processor, inputs=inputs, estimator=estimator, images=[example.image],
                                   regions=toy_regions(model, inputs, [example.image], estimator), timeout=120)
    streamer.generate(**inputs, max_new_tokens=96, do_sample=False)
    trace = live(streamer)
    generated = plain[0, inputs["input_ids"].shape[1]:].tolist()
    assert [t.token_id for t in trace.tokens] == generated
    assert len(trace.spans) >= 2 and trace.images == [example.image]
    final_table = [o for o in shell.display_pub.outputs if o["update"]][-1]["data"]["text/html"]
    assert all(s.text.strip() in final_table for s in trace.spans)


def test_the_live_view_of_a_video_draws_its_filmstrip(shell):
    """The notebook's current picture of a video trace is the viz filmstrip of the step being written, and the
    step table names regions by their seconds."""
    import base64
    import io
    import re

    import numpy as np
    from PIL import Image

    from hf_vattr.viz import score_units, step_overlay
    from test_video_viz import video_frames, video_trace

    trace = video_trace([video_frames(), toy_image()])
    running = trace.tokens[trace.spans[-1].token_range[1]:]
    assert not running  # every token is in a finished step: the view shows the last step's scores
    view = LiveView(trace, interval=0.0)
    view.update(force=True)
    html = [o for o in shell.display_pub.outputs if o["update"]][0]["data"]["text/html"]
    uri = re.search(r"src='data:image/png;base64,([^']+)'", html).group(1)
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(uri))).convert("RGB"))
    expected = step_overlay(trace.regions, trace.images, trace.spans[-1].region_scores, caption="current step",
                            units=score_units(trace))
    assert np.array_equal(shown, np.asarray(expected))
    table = [o for o in shell.display_pub.outputs if o["update"]][-1]["data"]["text/html"]
    assert re.search(r"\d\.\d-\d\.\d s, ", table)
