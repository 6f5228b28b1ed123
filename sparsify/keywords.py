"""Refusing keywords a public function does not take, naming the ones it does.

Python's own message ("upcycle() got an unexpected keyword argument 'x'") does not say what the
function takes, and keywords that travel on through `**options` fail far from the call
("MoEConfig.__init__() got an unexpected keyword argument"). These checks run at the call.
"""

from __future__ import annotations

import difflib
import functools
import inspect
from typing import Any, Callable, Iterable, TypeVar

from .errors import ArgumentError

__all__ = ["check_keywords", "refuse_unknown_keywords", "keyword_names"]

F = TypeVar("F", bound=Callable[..., Any])

# Keywords people pass to the wrong function, and where they belong.
_ELSEWHERE = {
    "format": "the output format is chosen when saving: sparsify.save(model, out, format=...)",
    "shard_size": "shards are cut when saving: sparsify.save(model, out, shard_size=...)",
    "force": "force is an argument of sparsify.save",
    "out": "to write the model, call sparsify.save(model, out)",
    "dtype": "convert the model with model.to(dtype) before or after upcycling",
}


def keyword_names(fn: Callable[..., Any]) -> list[str]:
    """The parameters of `fn` that can be passed by keyword, in signature order."""
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return [p.name for p in inspect.signature(fn).parameters.values() if p.kind in kinds]


def check_keywords(function: str, given: Iterable[str], accepted: Iterable[str]) -> None:
    """Raise `ArgumentError` for the first keyword in `given` that is not in `accepted`."""
    accepted = list(accepted)
    for name in given:
        if name in accepted:
            continue
        close = difflib.get_close_matches(name, accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        if name in _ELSEWHERE and not close:
            hint = f" ({_ELSEWHERE[name]})"
        raise ArgumentError(f"{function}() got an unexpected keyword argument {name!r}{hint}; "
                            f"it takes: {', '.join(accepted)}")


def refuse_unknown_keywords(fn: F) -> F:
    """Decorate `fn` (without **kwargs) so that an unknown keyword names `fn`'s own arguments."""
    accepted = keyword_names(fn)

    @functools.wraps(fn)
    def checked(*args: Any, **kwargs: Any) -> Any:
        check_keywords(f"sparsify.{fn.__name__}", kwargs, accepted)
        return fn(*args, **kwargs)

    return checked  # type: ignore[return-value]
