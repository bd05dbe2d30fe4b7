"""`hf-vattr app` driven by a real headless Chromium, as a person would use it.

The app runs as `python -m hf_vattr.commands.cli app` (the bundled toy, a toy example preloaded) on a free
localhost port; Selenium drives Debian's `chromium` through `chromium-driver`. A script in the page
samples what is on screen every 20 ms (step items, the overlay picture and its caption, the streamed
text), so the assertions are about what was shown, in order; none is about how long anything took. Every
wait has a deadline.

Needs: `apt-get install chromium chromium-driver`, `pip install selenium "hf_vattr[app]"` (.ci/run does both).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any, Callable

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
REPO = Path(__file__).resolve().parents[1]
SCREENSHOT = REPO / "docs" / "app.png"



def _missing(what: str) -> None:
    """Skip on a developer's machine without the browser stack; in CI (.ci/run installs it) that is an error."""
    if os.environ.get("CI"):
        raise RuntimeError(f"browser tests need {what}; .ci/run installs it")
    pytest.skip(f"needs {what}", allow_module_level=True)


try:
    import gradio  # noqa: F401
    import selenium  # noqa: F401
except ImportError as err:
    _missing(f'pip install selenium "hf_vattr[app]" ({err})')
if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
    _missing("Debian's chromium and chromium-driver (apt-get install chromium chromium-driver)")

from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402

# Samples the page every 20 ms and keeps each distinct state: what a person saw, in order.
RECORDER = """
window.__states = [];
const text = () => { const t = document.querySelector('#vattr-text textarea'); return t ? t.value : ''; };
const snap = () => {
  const ov = document.querySelector('#vattr-overlay .vattr-ov');
  const img = ov ? ov.querySelector('img') : null;
  return {
    steps: Array.from(document.querySelectorAll('#vattr-steps label')).map(l => l.innerText.trim()),
    kind: ov ? ov.dataset.kind : 'none', step: ov ? ov.dataset.step : '',
    src: img ? img.getAttribute('src') : '', text: text(),
    message: (document.querySelector('#vattr-message') || {}).innerText || '',
  };
};
const same = (a, b) => a.steps.join('|') === b.steps.join('|') && a.kind === b.kind && a.step === b.step
  && a.src === b.src && a.text === b.text && a.message === b.message;
window.__recorder = setInterval(() => {
  const s = snap(); const last = window.__states[window.__states.length - 1];
  if (!last || !same(last, s)) window.__states.push(s);
}, 20);
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(what: str, condition: Callable[[], Any], timeout: float = 30.0, every: float = 0.05) -> Any:
    """Poll ``condition`` until it returns something truthy; fail with ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = condition()
        except Exception:  # an element mid-rerender
            value = None
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(every)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory):
    """`hf-vattr app` (the toy) in a subprocess on a free port; its URL."""
    port = _free_port()
    log = tmp_path_factory.mktemp("app") / "app.log"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "hf_vattr.commands.cli", "app", "--port", str(port)],
                                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO)
    url = f"http://127.0.0.1:{port}/"

    def up() -> bool:
        if proc.poll() is not None:
            pytest.fail(f"the app exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            return urllib.request.urlopen(url, timeout=2).status == 200
        except OSError:
            return False

    try:
        wait_for("the app to serve its page", up, timeout=120, every=0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory):
    """A fresh headless Chromium (its own profile, nothing fetched from the network)."""
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-dev-shm-usage",
                 "--window-size=1400,1250"):
        options.add_argument(flag)
    options.add_argument(f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(60)
    driver.set_script_timeout(30)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(scope="module")
def plain_text() -> str:
    """What plain `model.generate` writes for the preloaded toy example (the app's first example)."""
    from hf_vattr.commands.demo import HELD_OUT_SEED
    from hf_vattr.toy import load_toy_model, make_examples, prompt_messages

    model, processor = load_toy_model()
    example = make_examples(1, seed=HELD_OUT_SEED)[0]
    prompt = processor.apply_chat_template(prompt_messages(example), add_generation_prompt=True, tokenize=False)
    inputs = processor(text=[prompt], images=[example.image], return_tensors="pt")
    out = model.generate(**inputs, max_new_tokens=1024, do_sample=False)
    return processor.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


def open_page(driver: Any, url: str) -> None:
    driver.get(url)
    wait_for("the page to render", lambda: driver.find_element(By.ID, "vattr-run").is_displayed(), timeout=60)
    wait_for("the preloaded example image", lambda: driver.find_elements(By.CSS_SELECTOR, "#vattr-image img"))


def message(driver: Any) -> str:
    return driver.find_element(By.ID, "vattr-message").text


def run_and_wait(driver: Any, timeout: float = 90, screenshot: Path | None = None) -> list[dict]:
    """Press Run with the recorder on; wait for 'Done'; return the states the page went through.

    With ``screenshot``, the page is saved there as soon as the first step is listed, and the run must
    still be going then (a mid-stream picture).
    """
    driver.execute_script(RECORDER)
    driver.find_element(By.ID, "vattr-run").click()
    if screenshot is not None:
        wait_for("the first finished step", lambda: driver.find_elements(By.CSS_SELECTOR, "#vattr-steps label"),
                 timeout=timeout, every=0.02)
        shot = driver.get_screenshot_as_png()
        status = message(driver)
        assert shot[:8] == b"\x89PNG\r\n\x1a\n"
        assert status.startswith("Thinking"), f"the screenshot was not taken mid-stream: {status!r}"
        screenshot.write_bytes(shot)
    wait_for("the run to finish ('Done' on the page)", lambda: message(driver).startswith("Done"), timeout=timeout)
    time.sleep(0.2)  # let the recorder take the final state
    return driver.execute_script("clearInterval(window.__recorder); return window.__states;")


def open_options(driver: Any) -> None:
    if not driver.find_elements(By.ID, "vattr-estimator"):
        driver.find_element(By.CSS_SELECTOR, "#vattr-options button").click()
        wait_for("the options to open", lambda: driver.find_element(By.ID, "vattr-estimator").is_displayed())


def set_text(driver: Any, elem_id: str, value: str) -> None:
    field = driver.find_element(By.CSS_SELECTOR, f"#{elem_id} textarea, #{elem_id} input")
    field.clear()
    field.send_keys(value)
    driver.find_element(By.ID, "vattr-question").click()  # blur: Gradio commits the value


def test_streams_steps_one_by_one_and_pins_a_step(server: str, browser: Any, plain_text: str,
                                                  tmp_path: Path) -> None:
    open_page(browser, server)
    # HF_VATTR_SCREENSHOT=1 refreshes the README's picture
    shot = SCREENSHOT if os.environ.get("HF_VATTR_SCREENSHOT") == "1" else tmp_path / "app.png"
    states = run_and_wait(browser, screenshot=shot)

    # the final text is plain generate's text for the same prompt
    final = wait_for("the final text", lambda: browser.find_element(By.CSS_SELECTOR, "#vattr-text textarea")
                     .get_attribute("value"))
    assert final == plain_text

    # step items appeared one at a time, in order, and each finished step's own picture was on screen before
    # the next step was listed (each step gets its own frame; frames are not coalesced across steps)
    counts = [len(s["steps"]) for s in states]
    n_steps = counts[-1]
    assert n_steps >= 2, counts
    assert counts == sorted(counts), f"the step list shrank while streaming: {counts}"
    assert set(range(1, n_steps + 1)) <= set(counts), f"some step count was never shown: {counts}"
    for n in range(1, n_steps + 1):
        assert any(len(s["steps"]) == n and s["kind"] == "step" and s["step"] == str(n - 1) for s in states), \
            f"step {n - 1}'s picture was not shown while {n} steps were listed"
    labels = states[-1]["steps"]
    for earlier in states:  # items are appended, never rewritten into other steps
        assert [lab.split(":")[0] for lab in earlier["steps"]] == [lab.split(":")[0] for lab in labels[:len(earlier["steps"])]]
    # the streamed text grew token by token before the end (not one final dump)
    texts = [s["text"] for s in states if s["text"]]
    assert len(set(texts)) >= n_steps and all(plain_text.startswith(t) for t in texts)
    # the overlay updated while tokens arrived and showed each finished step, all with different pictures
    assert any(s["kind"] == "live" for s in states), "no live (token-time) overlay was shown"
    step_pictures = {}
    for s in states:
        if s["kind"] == "step" and s["src"]:
            step_pictures.setdefault(s["step"], s["src"])
    assert sorted(step_pictures, key=int) == [str(i) for i in range(n_steps)]
    assert len(set(step_pictures.values())) == n_steps, "two steps showed the same overlay"
    # the answer is marked as scored through the thinking steps; no step is weak or indirect
    assert labels[-1].startswith("Answer") and "inherited from the thinking steps" in labels[-1]
    assert not any("weak" in lab or "indirect" in lab for lab in labels[:-1]), labels

    # clicking a finished step pins its heatmap: the picture shown when that step finished
    overlay = lambda: browser.find_element(By.CSS_SELECTOR, "#vattr-overlay .vattr-ov")  # noqa: E731
    for index in (0, 1, 0):
        browser.find_elements(By.CSS_SELECTOR, "#vattr-steps label")[index].click()
        wait_for(f"step {index} to be pinned", lambda: overlay().get_attribute("data-kind") == "pinned"
                 and overlay().get_attribute("data-step") == str(index))
        src = overlay().find_element(By.TAG_NAME, "img").get_attribute("src")
        assert src == step_pictures[str(index)]
        assert "Pinned" in overlay().text
    time.sleep(0.5)  # nothing overwrites a pin
    assert overlay().get_attribute("data-step") == "0" and overlay().get_attribute("data-kind") == "pinned"
    top = browser.find_element(By.ID, "vattr-top").text
    assert "of the image" in top  # top regions are named in words
    traj = browser.find_element(By.CSS_SELECTOR, "#vattr-trajectory img")
    assert traj.get_attribute("src")
    assert "Concentration per step" in browser.find_element(By.ID, "vattr-concentration").text


def _assert_refused(driver: Any, expected: str) -> None:
    """Run was refused with ``expected`` on the page, and no generation started (no text, no steps)."""
    driver.execute_script(RECORDER)
    driver.find_element(By.ID, "vattr-run").click()
    wait_for(f"the refusal message ({expected!r})", lambda: expected in message(driver), timeout=30)
    states = driver.execute_script("clearInterval(window.__recorder); return window.__states;")
    assert driver.find_elements(By.CSS_SELECTOR, "#vattr-message .vattr-error")
    assert not any(s["message"].startswith(("Running", "Thinking")) or s["steps"] for s in states), states
    assert driver.find_element(By.CSS_SELECTOR, "#vattr-text textarea").get_attribute("value") == ""


def test_bad_input_is_refused_and_the_app_still_works(server: str, browser: Any, tmp_path: Path,
                                                      plain_text: str) -> None:
    from hf_vattr.estimator import LinearEstimator

    # no image
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#vattr-image button[aria-label='Remove Image']").click()
    wait_for("the image to clear", lambda: not browser.find_elements(By.CSS_SELECTOR, "#vattr-image img"))
    _assert_refused(browser, "No image")

    # a corrupt image (a PNG name, not PNG bytes)
    corrupt = tmp_path / "photo.png"
    corrupt.write_bytes(b"\x89PNG\r\n\x1a\n" + b"definitely not image data" * 20)
    browser.find_element(By.CSS_SELECTOR, "#vattr-image input[type=file]").send_keys(str(corrupt))
    time.sleep(1.0)  # the upload
    _assert_refused(browser, "Could not read the image")

    # an estimator trained for another model
    open_page(browser, server)
    other = tmp_path / "other-estimator"
    LinearEstimator(28, 16, model_type="qwen2_5_vl", base_model_id="some/other-model").save_pretrained(other)
    open_options(browser)
    set_text(browser, "vattr-estimator", str(other))
    _assert_refused(browser, "trained for another model")

    # an unknown region method
    open_page(browser, server)
    open_options(browser)
    set_text(browser, "vattr-regions", "superpixels")
    _assert_refused(browser, "Unknown region method")

    # the app still works: the same page, inputs fixed, runs to the end
    set_text(browser, "vattr-regions", "vlm")
    states = run_and_wait(browser)
    assert states[-1]["text"] == plain_text and len(states[-1]["steps"]) >= 2


def upload_video(driver: Any, path: Path) -> None:
    """Clear the preloaded image and upload ``path`` into the video field."""
    driver.find_element(By.CSS_SELECTOR, "#vattr-image button[aria-label='Remove Image']").click()
    wait_for("the image to clear", lambda: not driver.find_elements(By.CSS_SELECTOR, "#vattr-image img"))
    driver.find_element(By.CSS_SELECTOR, "#vattr-video input[type=file]").send_keys(str(path))
    wait_for("the video upload", lambda: driver.find_elements(By.CSS_SELECTOR, "#vattr-video video"), timeout=30)


def test_a_video_streams_with_a_timeline_of_its_frame_groups(server: str, browser: Any, tmp_path: Path) -> None:
    from test_app import write_video

    clip = tmp_path / "clip.webm"
    write_video(clip, frames=30, fps=10)  # 3 s: sampled at 2 frames/s, 6 frames, 3 frame groups
    open_page(browser, server)
    upload_video(browser, clip)
    states = run_and_wait(browser, timeout=120)
    assert len(states[-1]["steps"]) >= 1 and states[-1]["text"]
    assert any(s["kind"] == "live" for s in states) and states[-1]["src"].startswith("data:image/png")
    # the timeline: one bar per frame group, labelled with its seconds, the tallest at full height
    bars = browser.find_elements(By.CSS_SELECTOR, "#vattr-timeline .vattr-bar")
    assert [b.get_attribute("data-group") for b in bars] == ["0", "1", "2"]
    times = browser.find_element(By.CSS_SELECTOR, "#vattr-timeline .vattr-times").text.split()
    assert times == ["0.0-1.0", "s", "1.0-2.0", "s", "2.0-3.0", "s"]
    heights = [b.value_of_css_property("height") for b in bars]
    assert all(h.endswith("px") for h in heights) and max(float(h[:-2]) for h in heights) > 50
    titles = [b.get_attribute("title") for b in bars]
    assert all(t.endswith(" nats") and " s: " in t for t in titles), titles
    # the top regions say when, then where; a pinned step keeps its timeline
    assert " s, " in browser.find_element(By.ID, "vattr-top").text
    browser.find_elements(By.CSS_SELECTOR, "#vattr-steps label")[0].click()
    wait_for("step 0 pinned", lambda: browser.find_element(By.CSS_SELECTOR, "#vattr-overlay .vattr-ov")
             .get_attribute("data-kind") == "pinned")
    assert len(browser.find_elements(By.CSS_SELECTOR, "#vattr-timeline .vattr-bar")) == 3


def test_a_video_that_cannot_be_decoded_is_refused_on_the_page(server: str, browser: Any, tmp_path: Path) -> None:
    corrupt = tmp_path / "holiday.webm"
    corrupt.write_bytes(b"\x1aE\xdf\xa3" + b"definitely not a video" * 40)
    open_page(browser, server)
    browser.find_element(By.CSS_SELECTOR, "#vattr-image button[aria-label='Remove Image']").click()
    wait_for("the image to clear", lambda: not browser.find_elements(By.CSS_SELECTOR, "#vattr-image img"))
    browser.find_element(By.CSS_SELECTOR, "#vattr-video input[type=file]").send_keys(str(corrupt))
    time.sleep(1.0)  # the upload
    _assert_refused(browser, "Could not read the video holiday.webm")
    assert "Traceback" not in message(browser)
