"""Token pieces: what the streamer and collection display, decoded in one place."""

import torch

from hf_vattr.reasoning.text import TokenTextDecoder, decode_pieces


def test_pieces_join_to_the_tokenizers_own_decode(family, get_tiny):
    _, proc = get_tiny(family)
    tok = proc.tokenizer
    tags = ("<think>", "</think>")
    special = {i for i in tok.all_special_ids if tok.decode([i], skip_special_tokens=False) not in tags}
    newline = tok.encode("\n", add_special_tokens=False)
    ids = torch.randint(0, len(tok), (400,), generator=torch.Generator().manual_seed(0)).tolist()
    ids[::37] = [newline[0]] * len(ids[::37])  # newlines restart the decode window
    shown = [i for i in ids if i not in special]
    pieces = decode_pieces(tok, ids)
    assert len(pieces) == len(ids)
    assert all(p == "" for i, p in zip(ids, pieces) if i in special)
    joined = "".join(pieces)
    reference = tok.decode(shown, skip_special_tokens=False)
    # Byte-level pieces held back at the very end (an incomplete character) are the only allowed difference.
    assert reference.startswith(joined) and len(reference) - len(joined) <= 4


def test_think_tags_are_shown(get_tiny):
    _, proc = get_tiny("qwen3_vl")
    tok = proc.tokenizer
    decoder = TokenTextDecoder(tok)
    pieces = [decoder.push(i) for i in tok.encode("<think>", add_special_tokens=False)]
    assert "".join(pieces) == "<think>"
