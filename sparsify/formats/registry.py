"""The output formats by name, and `auto`: a Hugging Face format when one fits and keeps the
requested meaning, else native."""

from __future__ import annotations

from typing import Any

from ..errors import OptionError
from ..plan import UpcyclePlan
from .base import OutputFormat
from .manifest import output_format  # noqa: F401  (its home, torch-free; still named here)
from .native import NativeFormat

__all__ = ["FORMATS", "FORMAT_NAMES", "get_format", "choose_format", "format_defaults", "output_format", "load_hf_output"]

FORMATS: dict[str, OutputFormat] = {"native": NativeFormat()}


def _register_hf_formats() -> None:
    # Hugging Face formats, most specific first: `auto` tries them in this order.
    import importlib

    for module, cls in (("mixtral", "MixtralFormat"), ("qwen_moe", "QwenMoEFormat"), ("switch", "SwitchFormat")):
        try:
            mod = importlib.import_module(f"{__package__}.{module}")
        except ModuleNotFoundError:
            continue
        fmt = getattr(mod, cls)()
        FORMATS[fmt.name] = fmt


_register_hf_formats()
FORMAT_NAMES = ("auto", *FORMATS)


def get_format(name: str) -> OutputFormat:
    """The format called `name` (not auto)."""
    try:
        return FORMATS[name]
    except KeyError:
        raise OptionError(f"--format must be one of {', '.join(FORMAT_NAMES)}, got {name!r}") from None


def format_defaults(name: str, config: Any) -> dict[str, Any]:
    """Options a format implies when the user did not set them (e.g. mixtral: every layer)."""
    if name == "auto":
        return {}
    return get_format(name).default_options(config)


def choose_format(name: str, plan: UpcyclePlan, config: Any) -> tuple[OutputFormat, str]:
    """The format to write and a sentence saying why; raises when a named format cannot
    express the plan (with the format's reason)."""
    if name != "auto":
        fmt = get_format(name)
        why_not = fmt.explain(plan, config)
        if why_not:
            raise OptionError(f"--format {name} cannot express this conversion: {why_not}")
        return fmt, f"{name} (requested)"
    reasons = []
    for fmt in FORMATS.values():
        if fmt.name == NativeFormat.name:
            continue
        why_not = fmt.explain(plan, config) or fmt.keeps_meaning(plan, config)
        if why_not is None:
            return fmt, f"{fmt.name}: the source and options fit it and keep their meaning"
        reasons.append(f"{fmt.name}: {why_not}")
    detail = "; ".join(reasons) if reasons else "no Hugging Face format is available"
    return FORMATS["native"], f"native, since no Hugging Face format fits ({detail})"


def load_hf_output(path):
    """A sparsify output in a Hugging Face format, loaded by its transformers class, with the plan
    it was made by attached as `sparsify_plan`."""
    from pathlib import Path

    from ..errors import SourceError
    from ..io.skeleton import model_class
    from .manifest import MANIFEST, plan_of, read_output_manifest
    from .native import read_config

    path = Path(path)
    manifest = read_output_manifest(path)
    plan = plan_of(manifest, path / MANIFEST)
    config = read_config(path)
    try:
        model = model_class(config).from_pretrained(path, dtype="auto", trust_remote_code=False, local_files_only=True)
    except Exception as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        raise SourceError(f"cannot load '{path}' ({manifest.get('format')} format): {first}") from None
    model.eval()
    model.sparsify_plan = plan
    model.sparsify_source = manifest.get("source", {})
    model.sparsify_loaded_from = path
    return model
