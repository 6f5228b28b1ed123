"""Prompts files: YAML or JSON, one entry per expert; a bad file is refused with its line."""

import json

import pytest

from sparsify.errors import OptionError
from sparsify.prompts import ExpertPrompts, prompt_set, read_prompts

GOOD_YAML = """\
# experts in order
- positive: ["def f(x):", "import os"]
  negative: ["Once upon a time"]
- positive:
    - The patient presented with
"""


def test_yaml_and_json_files_read_the_same(tmp_path):
    (tmp_path / "p.yaml").write_text(GOOD_YAML)
    entries = [{"positive": ["def f(x):", "import os"], "negative": ["Once upon a time"]},
               {"positive": ["The patient presented with"]}]
    (tmp_path / "p.json").write_text(json.dumps({"experts": entries}))
    a, b = read_prompts(tmp_path / "p.yaml"), read_prompts(tmp_path / "p.json")
    assert a.experts == b.experts == [ExpertPrompts(["def f(x):", "import os"], ["Once upon a time"]),
                                      ExpertPrompts(["The patient presented with"])]
    assert a.describe()["experts"] == 2 and len(a.sha256) == 64 and a.sha256 != b.sha256
    assert prompt_set(entries).experts == a.experts


BAD = {
    "empty": ("", "", "the file is empty"),
    "not yaml": ("- positive: [unclosed", "line 1", "not valid YAML"),
    "a scalar": ("hello", "line 1", "one entry of prompts per expert"),
    "unknown top key": ("prompts:\n  - positive: [a]\n", "line 1", "unknown key 'prompts'"),
    "entry not a mapping": ("- positive: [a]\n- just text\n", "line 2", "expert 1 must be a mapping"),
    "unknown entry key": ("- positive: [a]\n  negatives: [b]\n", "line 2", "unknown key 'negatives'"),
    "no positive": ("- negative: [a]\n", "line 1", "expert 0 has no positive prompts"),
    "empty positive": ("- positive: []\n", "line 1", "no positive prompts"),
    "a number": ("- positive: [a, 5]\n", "line 1", "non-empty strings, got '5'"),
    "a blank prompt": ("- positive:\n  - a\n  - '  '\n", "line 3", "non-empty strings"),
    "prompts not a list": ("- positive: just one\n", "line 1", "must be a list of strings"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_prompts_files_name_the_line(tmp_path, case):
    text, line, what = BAD[case]
    (tmp_path / "p.yaml").write_text(text)
    with pytest.raises(OptionError) as err:
        read_prompts(tmp_path / "p.yaml")
    message = str(err.value)
    assert "\n" not in message and what in message and "p.yaml" in message
    assert line in message


def test_missing_and_unreadable_prompts_files(tmp_path):
    with pytest.raises(OptionError, match="does not exist"):
        read_prompts(tmp_path / "none.yaml")
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(OptionError, match="not UTF-8"):
        read_prompts(tmp_path / "bin.yaml")
