"""Fine-tunes of one tiny base, for the tests of experts from several checkpoints.

`trained_finetunes` trains copies of a demo model briefly on different tiny tasks (each a token
pattern over its own range of the vocabulary), the way mergekit-moe's sources are fine-tunes of
one base; `perturbed` makes cheaper "fine-tunes" by adding seeded noise to every weight, for
sweeps over architectures. A word-level tokenizer (token i is the word `t{i}`) makes prompts
plain text.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, models, pre_tokenizers

from sparsify.io.demo import build_demo

__all__ = ["word_tokenizer", "save_checkpoint", "perturbed", "task_tokens", "task_text", "trained_finetunes"]

TASKS = 4
RANGE = 12  # tokens per task: task i uses t{16 + RANGE*i} .. t{16 + RANGE*(i+1) - 1}
STEPS = (1, 5, 7, 11)  # task i counts by STEPS[i] modulo RANGE (coprime: every token of the range occurs)


def word_tokenizer(vocab_size: int = 512) -> transformers.PreTrainedTokenizerFast:
    """Token i >= 3 is the word `t{i}` (0, 1, 2 are <s>, </s>, <unk>); words are split on whitespace."""
    special = {"<s>": 0, "</s>": 1, "<unk>": 2}
    tok = Tokenizer(models.WordLevel({**special, **{f"t{i}": i for i in range(3, vocab_size)}}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_checkpoint(model: torch.nn.Module, path: Path, tokenizer=None) -> Path:
    """`model` saved in Hugging Face layout with a word tokenizer of its vocabulary."""
    model.save_pretrained(path)
    (tokenizer or word_tokenizer(model.config.vocab_size)).save_pretrained(path)
    return path


@torch.no_grad()
def perturbed(name: str, seed: int, scale: float = 0.02) -> torch.nn.Module:
    """Demo `name` with seeded noise of std `scale` added to every parameter."""
    model = build_demo(name)
    g = torch.Generator().manual_seed(1000 + seed)
    for p in model.parameters():
        p.add_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * scale)
    return model


def task_tokens(task: int, length: int, start: int) -> list[int]:
    """A sequence of task `task`: counting by STEPS[task] within the task's token range."""
    low = 16 + RANGE * task
    return [low + (start + k * STEPS[task]) % RANGE for k in range(length)]


def task_text(task: int, length: int, start: int) -> str:
    """`task_tokens` as text for the word tokenizer."""
    return " ".join(f"t{i}" for i in task_tokens(task, length, start))


def trained_finetunes(name: str = "llama", steps: int = 30, seed: int = 0) -> tuple[torch.nn.Module, list[torch.nn.Module]]:
    """A base trained for `steps` AdamW steps on a mix of the TASKS tasks (next-token
    prediction), and TASKS copies of it, each trained `steps` more on its own task."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matmuls: more threads only wait for each other
    try:
        base = _train(build_demo(name, seed=seed), list(range(TASKS)), steps, seed)
        tuned = []
        for task in range(TASKS):
            tuned.append(_train(copy.deepcopy(base), [task], steps, seed + 1 + task))
    finally:
        torch.set_num_threads(threads)
    return base, tuned


def _train(model: torch.nn.Module, tasks: list[int], steps: int, seed: int) -> torch.nn.Module:
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        starts = torch.randint(0, RANGE, (8,), generator=g).tolist()
        ids = torch.tensor([task_tokens(tasks[k % len(tasks)], 16, s) for k, s in enumerate(starts)])
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
