"""`MoEConfig`: every knob of an MoE layer in one flat, validated dataclass."""

from __future__ import annotations

import math

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from ..errors import OptionError

__all__ = ["MoEConfig", "ROUTER_KINDS"]

ROUTER_KINDS = ("topk", "switch", "expert-choice")


@dataclass
class MoEConfig:
    """How an MoE layer routes tokens. Validated on construction; `to_dict`/`from_dict` round-trip."""

    num_experts: int = field(default=8, metadata={"help": "experts per MoE layer (at least 2)"})
    top_k: int | None = field(default=None, metadata={"help": "experts per token [default: 2; switch: 1]"})
    router: str = field(default="topk", metadata={"help": "topk | switch | expert-choice"})
    normalize: bool = field(
        default=True,
        metadata={"help": "renormalise the k routing weights to sum to 1 (topk only)"},
    )
    capacity_factor: float | None = field(
        default=None,
        metadata={"help": "expert capacity = ceil(cf * tokens * k / E); None means dropless"},
    )
    jitter: float = field(default=0.0, metadata={"help": "multiplicative input jitter in training"})
    aux_loss_coef: float = field(default=0.01, metadata={"help": "weight of the balancing loss"})
    z_loss_coef: float = field(default=0.001, metadata={"help": "weight of the router z-loss"})
    router_dtype: str = field(default="float32", metadata={"help": "dtype of the router math"})

    def __post_init__(self) -> None:
        if not isinstance(self.num_experts, int) or self.num_experts < 2:
            raise OptionError(f"--experts must be at least 2, got {self.num_experts}")
        if self.router not in ROUTER_KINDS:
            raise OptionError(f"--router must be one of {', '.join(ROUTER_KINDS)}, got {self.router!r}")
        if self.top_k is None:
            self.top_k = 1 if self.router == "switch" else 2
        if self.router == "switch" and self.top_k != 1:
            raise OptionError(f"--router switch routes each token to 1 expert; drop --top-k {self.top_k}")
        if not isinstance(self.top_k, int) or not 1 <= self.top_k <= self.num_experts:
            raise OptionError(
                f"--top-k must be between 1 and the expert count ({self.num_experts}), got {self.top_k}"
            )
        if self.capacity_factor is not None and (isinstance(self.capacity_factor, bool) or not isinstance(self.capacity_factor, (int, float))):
            raise OptionError(f"--capacity-factor must be a finite number above 0, got {self.capacity_factor!r}")
        if self.capacity_factor is not None and not (self.capacity_factor > 0 and math.isfinite(self.capacity_factor)):
            raise OptionError(f"--capacity-factor must be a finite number above 0, got {self.capacity_factor}")
        if self.router == "expert-choice" and self.capacity_factor is None:
            self.capacity_factor = 1.0  # expert choice always has a capacity: tokens per expert
        if not isinstance(self.normalize, bool):
            raise OptionError(f"normalize must be true or false, got {self.normalize!r}")
        for name in ("jitter", "aux_loss_coef", "z_loss_coef"):  # the routers compute with them in training
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise OptionError(f"{name} must be a finite number of at least 0, got {value!r}")
        if self.router_dtype not in ("float32", "float64"):
            raise OptionError(f"router_dtype must be float32 or float64, got {self.router_dtype!r}")

    @property
    def preserves_function(self) -> bool:
        """True when identical experts make this layer return exactly the dense FFN's output."""
        return self.router == "topk" and self.normalize and self.capacity_factor is None

    def why_not_preserving(self) -> str | None:
        """Why this routing does not reproduce the dense outputs at initialisation (None if it does)."""
        if self.router == "switch":
            return "switch routing scales each expert output by its router probability (p * FFN(x))"
        if self.router == "expert-choice":
            return "expert-choice routing weights outputs by router probability and may skip tokens"
        if not self.normalize:
            return "without --normalize the top-k weights do not sum to 1"
        if self.capacity_factor is not None:
            return "with a capacity factor, tokens over an expert's capacity are dropped"
        return None

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MoEConfig":
        """Inverse of `to_dict`; ignores unknown keys so that newer plans still load."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})
