from hf_vattr.spans import ReasoningStepSplitter


def _split(pieces, prompt="<|im_start|>assistant\n<think>\n", **kwargs):
    splitter = ReasoningStepSplitter(**kwargs)
    splitter.reset(prompt)
    out = []
    for i, piece in enumerate(pieces):
        out += splitter.push(i, piece)
    return out + splitter.flush()


def test_lines_and_sentences_in_thinking_then_answer():
    pieces = ["First", " step", ".", " Then", " more", ".\n", "\n", "Second", " line\n", "</think>", "\n",
              "The", " answer", " is", " red", "."]
    spans = _split(pieces)
    assert [(s.text, s.start, s.end, s.section) for s in spans] == [
        ("First step.", 0, 3, "thinking"),
        ("Then more.", 3, 6, "thinking"),
        ("Second line", 7, 9, "thinking"),
        ("The answer is red.", 11, 16, "answer"),
    ]


def test_lines_only():
    spans = _split(["a", ". b", ".\n", "c\n"], split_sentences=False)
    assert [s.text for s in spans] == ["a. b.", "c"]


def test_think_block_opened_by_the_model():
    spans = _split(["<think>", "look\n", "</think>", "yes"], prompt="user: q\nassistant:")
    assert [(s.text, s.section) for s in spans] == [("look", "thinking"), ("yes", "answer")]


def test_prompt_without_think_starts_in_answer():
    spans = _split(["yes", " it", " is\n", "done"], prompt="no thinking here")
    assert [(s.text, s.section) for s in spans] == [("yes it is", "answer"), ("done", "answer")]
