"""The scripts in examples/ run as documented (on the bundled toy model, offline)."""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(cmd: list[str], tmp_path: Path, **env: str) -> str:
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", **env})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


def _run_script(path: Path, argv: list[str], tmp_path: Path, monkeypatch) -> None:
    """``python path *argv`` in tmp_path, in this process (a subprocess would only add seconds of imports)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", [str(path), *argv])
    runpy.run_path(str(path), run_name="__main__")


@pytest.mark.slow
def test_stream_attributions_example(tmp_path, monkeypatch, capsys):
    _run_script(EXAMPLES / "stream_attributions.py", ["--html", "report.html"], tmp_path, monkeypatch)
    out = capsys.readouterr().out
    steps = re.findall(r"\[thinking step \d+\] relies on #(\d+)", out)
    assert len(steps) >= 1 and "</think>" in out and "[answer step" in out
    html = (tmp_path / "report.html").read_text()
    assert html.startswith("<!DOCTYPE html>") or "<html" in html[:200]
    assert "data:image/png;base64," in html  # self-contained


def test_stream_attributions_example_refuses_half_a_real_model_spec(tmp_path, monkeypatch, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _run_script(EXAMPLES / "stream_attributions.py", ["--model", "x/y"], tmp_path, monkeypatch)
    assert exit_info.value.code == 2 and "--image and --question are required" in capsys.readouterr().err


@pytest.mark.slow  # three `hf-vattr` processes (collect, train, eval with the model)
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("hf-vattr") is None, reason="needs bash and the CLI")
def test_train_estimator_example(tmp_path):
    out = _run(["bash", str(EXAMPLES / "train_estimator.sh")], tmp_path, OUT=str(tmp_path / "run"), N="4", K="8",
               MAX_NEW_TOKENS="64")
    assert "| estimator |" in out and "| leave_one_out |" in out
    est = tmp_path / "run" / "estimator"
    assert (est / "config.json").exists() and (est / "model.safetensors").exists()
    report = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert "estimator" in json.dumps(report)
