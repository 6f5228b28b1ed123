"""Build a transformers architecture from its config without allocating its weights.

Parameters are created on the meta device; buffers (rotary tables, position ids, masks) are
computed on the CPU as usual, since they are derived from the config and never stored in
checkpoints. Under a plain `torch.device("meta")` context they would be lost.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch.nn as nn

from ..errors import SourceError

__all__ = ["params_on_meta", "build_skeleton", "model_class"]


@contextlib.contextmanager
def params_on_meta() -> Iterator[None]:
    """Every parameter registered inside the block lands on the meta device. The parameter is
    moved at registration, before modules run their own initialisation, which then costs
    nothing. (accelerate's init_empty_weights does the same; it is not a dependency here.)"""
    original = nn.Module.register_parameter

    def register(self, name, param):
        original(self, name, param)
        if param is not None and param.device.type != "meta":
            p = self._parameters[name]
            self._parameters[name] = nn.Parameter(p.to("meta"), requires_grad=p.requires_grad)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def model_class(config):
    """The transformers class named by `config.architectures`; when none is, the base model
    class of the config's type (what `AutoModel.from_config` builds)."""
    import transformers

    archs = getattr(config, "architectures", None) or []
    if not isinstance(archs, list) or not all(isinstance(a, str) for a in archs):
        raise SourceError(f"config.json's 'architectures' must be a list of class names, got {archs!r:.80}; "
                          "fix the config")
    for arch in archs:
        cls = getattr(transformers, arch, None)
        # only a model class: a name such as "AutoConfig" or "logging" names something else
        if isinstance(cls, type) and issubclass(cls, transformers.PreTrainedModel):
            return cls
    return transformers.AutoModel._model_mapping.get(type(config), transformers.AutoModel)


def build_skeleton(config, cls=None) -> nn.Module:
    """The architecture of `config` with meta parameters and real buffers, in eval mode."""
    cls = cls or model_class(config)
    try:
        with params_on_meta():
            model = cls(config)
    except Exception as err:
        raise SourceError(f"cannot build {cls.__name__} from its config: {str(err).splitlines()[0][:200]}") from None
    return model.eval()
