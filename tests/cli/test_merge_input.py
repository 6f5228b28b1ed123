"""`sparsify upcycle BASE --experts-from ...`: bad sources and bad router data give one line,
a non-zero exit, and leave nothing behind (and nothing of the sources changed)."""

import hashlib

import pytest
import transformers

from tests.cli.test_bad_input import _assert_clean_failure
from tests.finetunes import perturbed, save_checkpoint, word_tokenizer


@pytest.fixture
def base(tmp_path, demo):
    return save_checkpoint(demo("llama"), tmp_path / "base")


def _source(tmp_path, name="src", **config):
    model = perturbed("llama", 1)
    if config:
        cfg = model.config.to_dict() | config
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg))
    return save_checkpoint(model, tmp_path / name)


def _other_vocabulary(tmp_path):
    src = _source(tmp_path, "vocab")
    tok = word_tokenizer()
    vocab = tok.get_vocab()
    swapped = {**vocab, "t7": vocab["t8"], "t8": vocab["t7"]}
    from tokenizers import Tokenizer, models, pre_tokenizers

    inner = Tokenizer(models.WordLevel(swapped, unk_token="<unk>"))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    transformers.PreTrainedTokenizerFast(tokenizer_object=inner, unk_token="<unk>").save_pretrained(src)
    return src


def _gpt2(tmp_path):
    return save_checkpoint(perturbed("gpt2", 1), tmp_path / "gpt2")


SOURCES = {
    "other architecture": (_gpt2, "is a gpt2 model"),
    "other shapes": (lambda t: _source(t, "wide", intermediate_size=256), "of shape (256, 64), the base (128, 64)"),
    "other activation": (lambda t: _source(t, "gelu", hidden_act="gelu"), "uses the activation gelu"),
    "other vocabulary": (_other_vocabulary, "token 't7' is id 8 there and 7 in the base"),
    "missing path": (lambda t: t / "no" / "such", "expert source"),
    "upcycled model": (None, "already an upcycled model"),
}


@pytest.mark.parametrize("case", list(SOURCES))
def test_incompatible_or_missing_sources(tmp_path, base, sparsify_cli, case):
    make, match = SOURCES[case]
    if make is None:
        code, _, err = sparsify_cli("upcycle", base, "--experts", "2", "-o", tmp_path / "moe")
        assert code == 0, err
        bad = tmp_path / "moe"
    else:
        bad = make(tmp_path)
    good = _source(tmp_path, "good")
    code, out, err = sparsify_cli("upcycle", base, "--experts-from", f"{good},{bad}", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, match)


def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("force", [False, True])
@pytest.mark.parametrize("which", ["source", "base", "inside a source"])
def test_output_may_not_be_a_source(tmp_path, base, sparsify_cli, which, force):
    src = _source(tmp_path)
    out = {"source": src, "base": base, "inside a source": src / "moe"}[which]
    before = _digest(src), _digest(base)
    code, _, err = sparsify_cli("upcycle", base, "--experts-from", f"{src},{src}", "-o", out, *(["--force"] if force else []))
    assert code != 0 and "Traceback" not in err
    lines = [line for line in err.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and "the source" in lines[0] and "choose an output path outside it" in lines[0], err
    assert (_digest(src), _digest(base)) == before


PROMPTS = {
    "no positive prompts": ("- negative: [t5]\n- positive: [t6]\n", ["--router-init", "prompts"], "line 1"),
    "not YAML": ("- positive: [t5\n", ["--router-init", "prompts"], "not valid YAML or JSON"),
    "wrong count": ("- positive: [t5]\n- positive: [t6]\n- positive: [t7]\n", ["--router-init", "prompts"],
                    "the prompts list 3 experts"),
    "no router init": ("- positive: [t5]\n- positive: [t6]\n", [], "set router_init"),
}


@pytest.mark.parametrize("case", list(PROMPTS))
def test_bad_prompts(tmp_path, base, sparsify_cli, case):
    text, flags, match = PROMPTS[case]
    (tmp_path / "p.yaml").write_text(text)
    src = _source(tmp_path)
    code, out, err = sparsify_cli("upcycle", base, "--experts-from", f"{src},{src}", *flags, "--prompts",
                                  tmp_path / "p.yaml", "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, match)


@pytest.mark.parametrize("args,match", [
    (["--experts-from", "SRC,SRC", "--router-init", "prompts"], "needs prompts"),
    (["--experts-from", "SRC,SRC", "--router-init", "kmeans"], "needs calibration"),
    (["--experts-from", "SRC,SRC", "--merge-base", "middle"], "must be one of base, average"),
    (["--experts", "4", "--merge-base", "average"], "give experts_from"),
    (["--experts-from", "SRC,SRC", "--experts", "3"], "experts_from names 2 sources for 3 experts"),
    (["--router-init", "prompts", "--experts", "2", "--prompts", "MISSING"], "does not exist"),
    ([], "give the expert count (--experts N)"),
])
def test_bad_merge_options(tmp_path, base, sparsify_cli, args, match):
    src = str(_source(tmp_path))
    args = [a.replace("SRC", src).replace("MISSING", str(tmp_path / "none.yaml")) for a in args]
    code, out, err = sparsify_cli("upcycle", base, *args, "-o", tmp_path / "out")
    _assert_clean_failure(code, out, err, tmp_path, match)


def test_merge_through_the_cli_names_the_sources(tmp_path, base, sparsify_cli):
    a, b = _source(tmp_path, "a"), _source(tmp_path, "b")
    code, out, err = sparsify_cli("upcycle", base, "--experts-from", f"{a},{b}", "--merge-base", "average",
                                  "--format", "native", "-o", tmp_path / "out")
    assert code == 0, err
    assert "averaged over several checkpoints" in out
    import json

    plan = json.loads((tmp_path / "out" / "sparsify.json").read_text())["plan"]
    assert list(plan["sources"]) == [str(a), str(b)] and plan["merge_base"] == "average"
    assert [x["source"] for x in plan["layers"][plan["selected"][0]]["experts"]] == [str(a), str(b)]
