"""The GGUF writer names the pre-tokenizer from tokenizer.json's regexes, whichever way they are spelled."""

import copy
import json
from pathlib import Path

import pytest
from tokenizers import Regex, pre_tokenizers

from convert.errors import BadInput
from convert.fixtures import BUNDLED_FIXTURE
from convert.gguf_vocab import _DEEPSEEK_V3_SPLITS, _DEEPSEEK_V3_SPLITS_ESCAPED, pre_tokenizer_name

# CR, LF, CRLF runs, quotes, backslashes, brackets, digits, CJK, kana, accents: every branch of the regexes.
SAMPLE = 'a = "x\\\\y"\r\n\tif b[1]:\n\n  return 12345 # 東京 カタカナ ひらがな café\r\r\n.foo\\bar \'q\' `z`  \n'


def _tokenizer_json(splits) -> dict:
    steps = [{"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False} for r in splits]
    steps.append({"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False})
    return {"pre_tokenizer": {"type": "Sequence", "pretokenizers": steps}}


def _pieces(splits) -> list[str]:
    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(r), behavior="isolated", invert=False)
                                   for r in splits])
    return [p for p, _ in pre.pre_tokenize_str(SAMPLE)]


def test_both_spellings_are_deepseek_v3():
    assert _DEEPSEEK_V3_SPLITS != _DEEPSEEK_V3_SPLITS_ESCAPED
    assert "\r" in _DEEPSEEK_V3_SPLITS[2] and "\r" not in _DEEPSEEK_V3_SPLITS_ESCAPED[2]
    for splits in (_DEEPSEEK_V3_SPLITS, _DEEPSEEK_V3_SPLITS_ESCAPED):
        assert pre_tokenizer_name(_tokenizer_json(splits), Path("tokenizer.json")) == "deepseek-v3"


def test_spellings_split_text_identically():
    """Accepting a second spelling is only right if it splits text exactly as the first (llama.cpp's) does."""
    literal, escaped = _pieces(_DEEPSEEK_V3_SPLITS), _pieces(_DEEPSEEK_V3_SPLITS_ESCAPED)
    assert literal == escaped
    assert "".join(literal) == SAMPLE
    # CR/LF runs close a punctuation piece or stand alone; digits go in 3s
    assert '"\r\n' in literal and "\r\r\n" in literal and literal[literal.index("123") + 1] == "45"


def test_bundled_fixture_tokenizer_is_deepseek_v3():
    raw = json.loads((BUNDLED_FIXTURE / "tokenizer.json").read_text(encoding="utf-8"))
    assert pre_tokenizer_name(raw, BUNDLED_FIXTURE / "tokenizer.json") == "deepseek-v3"


@pytest.mark.parametrize("change", ["regex", "behavior", "byte_level_regex", "missing_step"])
def test_other_pre_tokenizers_are_refused(change):
    raw = _tokenizer_json(_DEEPSEEK_V3_SPLITS)
    bad = copy.deepcopy(raw)
    steps = bad["pre_tokenizer"]["pretokenizers"]
    if change == "regex":  # llama.cpp's DeepSeek-coder-style `\p{N}` instead of `\p{N}{1,3}`
        steps[0]["pattern"]["Regex"] = "\\p{N}"
    elif change == "behavior":
        steps[1]["behavior"] = "Removed"
    elif change == "byte_level_regex":  # ByteLevel's own GPT-2 regex would split again
        steps[-1]["use_regex"] = True
    else:
        del steps[0]
    with pytest.raises(BadInput, match="pre-tokenizer not recognised .*deepseek-v3"):
        pre_tokenizer_name(bad, Path("tokenizer.json"))
