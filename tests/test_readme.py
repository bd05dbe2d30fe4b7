"""The README's Usage snippet runs exactly as written."""

import re
import threading
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_usage_snippet_runs_as_written(capsys):
    text = README.read_text()
    usage = text[text.index("## Usage"):]
    code = re.search(r"```python\n(.*?)```", usage, re.S).group(1)
    namespace: dict = {}
    thread = threading.Thread(target=exec, args=(code, namespace), daemon=True)
    thread.start()
    thread.join(120)
    assert not thread.is_alive(), "the README example hung"
    printed = capsys.readouterr().out
    assert "->" in printed  # at least one reasoning step with its top regions
    streamer = namespace["streamer"]
    assert streamer.trace.spans and streamer.trace.text
