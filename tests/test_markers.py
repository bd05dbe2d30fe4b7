"""The suite's markers: ``-m "not slow"`` (the quick loop) really leaves the slow tests out, and a misspelt
marker is an error instead of a test that no ``-m`` ever selects or leaves out."""

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

_EXAMPLE = """
import pytest

@pytest.mark.slow
def test_heavy():
    pass

def test_light():
    pass
"""


def _outcomes(pytester, *args) -> dict:
    """Passed and deselected counts of an in-process run under the project's own pytest settings."""
    pytester.makefile(".cfg", setup=(REPO / "setup.cfg").read_text())
    result = pytester.runpytest_inprocess("-p", "no:hypothesispytest", *args)  # its summary costs seconds a run
    counts = result.parseoutcomes()
    return {key: counts.get(key, 0) for key in ("passed", "deselected", "errors")}


def test_not_slow_leaves_out_exactly_the_slow_tests(pytester):
    pytester.makepyfile(test_example=_EXAMPLE)
    assert _outcomes(pytester, "-m", "not slow") == {"passed": 1, "deselected": 1, "errors": 0}
    assert _outcomes(pytester, "-m", "slow") == {"passed": 1, "deselected": 1, "errors": 0}
    assert _outcomes(pytester) == {"passed": 2, "deselected": 0, "errors": 0}


def test_an_unregistered_marker_fails_collection(pytester):
    pytester.makepyfile(test_example=_EXAMPLE.replace("mark.slow", "mark.slwo"))
    assert _outcomes(pytester, "-m", "not slow")["errors"] == 1


def _slow_tests(path: Path) -> list[str]:
    """Tests of a file marked slow: the function, its module (``pytestmark``) or one of its parameters."""
    tree = ast.parse(path.read_text())
    module_slow = any(isinstance(node, ast.Assign) and any(getattr(t, "id", "") == "pytestmark" for t in node.targets)
                      and "mark.slow" in ast.unparse(node.value) for node in tree.body)
    return [node.name for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name.startswith("test_")
            and (module_slow or any("mark.slow" in ast.unparse(d) for d in node.decorator_list))]


def test_the_quick_loop_leaves_out_the_heavy_end_to_end_runs():
    """The tests that run whole pipelines (faithfulness report, the examples, subprocess exits) carry the marker."""
    slow = {name for path in (REPO / "tests").glob("test_*.py") for name in _slow_tests(path)}
    assert {"test_runner_writes_report_estimator_and_json", "test_train_estimator_example",
            "test_script_that_leaves_the_loop_and_ends_exits_cleanly"} <= slow
