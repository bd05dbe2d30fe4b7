from hf_vattr.reasoning.spans import ReasoningStepSplitter


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


def _split_with_sections(pieces, prompt, fmt):
    from hf_vattr.reasoning.formats import FORMATS
    splitter = ReasoningStepSplitter(format=FORMATS[fmt])
    splitter.reset(prompt)
    out, sections = [], []
    for i, piece in enumerate(pieces):
        out += splitter.push(i, piece)
        sections += splitter.pop_sections()
    out += splitter.flush()
    sections += splitter.pop_sections()
    assert len(sections) == len(pieces)
    return [(s.text, s.start, s.end, s.section) for s in out], sections


def test_plain_text_tags_over_several_pieces_and_a_piece_with_a_sentence_end():
    pieces = ["<th", "ink", ">\n", "It", " is", " red", ".</th", "ink>", "\n\n", "<", "answer", ">\n", "red", "\n",
              "</", "answer", ">"]
    spans, sections = _split_with_sections(pieces, "<|im_start|>assistant\n", "cosmos_reason1")
    assert spans == [("It is red.", 3, 7, "thinking"), ("red", 12, 14, "answer")]
    assert sections == ["tag", "tag", "tag", "thinking", "thinking", "thinking", "thinking", "tag", "answer", "tag",
                        "tag", "tag", "answer", "answer", "tag", "tag", "tag"]


def test_text_that_only_looks_like_a_tag_start_stays_text():
    spans, sections = _split_with_sections(["3", " <", " 4", ".", " <th", "ing", ">", "\n", "<"], "<think>\n",
                                           "cosmos_reason1")
    assert spans == [("3 < 4.", 0, 4, "thinking"), ("<thing>", 4, 8, "thinking"), ("<", 8, 9, "thinking")]
    assert sections == ["thinking"] * 9


def test_cjk_sentence_ends():
    spans, _ = _split_with_sections(["圆", "是", "红色", "的", "。", "它", "在", "左边", "！", "所以", "\n", "</think>",
                                     "红色"], "<think>\n", "qwen3_vl_thinking")
    assert spans == [("圆是红色的。", 0, 5, "thinking"), ("它在左边！", 5, 9, "thinking"), ("所以", 9, 11, "thinking"),
                     ("红色", 12, 13, "answer")]


def test_glm_answer_and_box_tags():
    pieces = ["\n", "<think>", "\n", "Red", ".", "\n", "</think>", "<answer>", "It", " is", " ", "<|begin_of_box|>",
              "red", "<|end_of_box|>", "</answer>"]
    spans, sections = _split_with_sections(pieces, "[gMASK]<sop><|user|>\nq<|assistant|>", "glm4v_thinking")
    assert spans == [("Red.", 3, 5, "thinking"), ("It is", 8, 11, "answer"), ("red", 12, 13, "answer")]
    assert sections == ["thinking", "tag", "thinking", "thinking", "thinking", "thinking", "tag", "tag", "answer",
                        "answer", "answer", "tag", "answer", "tag", "tag"]
