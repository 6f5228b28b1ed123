"""Every activation of `sparsify.activations` and its derivative, as Triton device functions.

An activation is picked by a compile-time code (`ACT_CODES[name]`), so each kernel is compiled
for one activation with no branching at run time. Only `tl.exp`, `tl.log`, `tl.sigmoid` and
`tl.erf` are used, the functions Triton's CPU interpreter implements too; tanh is written as
2 sigmoid(2x) - 1. Math is in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["ACT_CODES", "act_forward", "act_derivative"]

ACT_CODES = {
    "relu": 0,
    "gelu": 1,
    "gelu_tanh": 2,
    "silu": 3,
    "quick_gelu": 4,
    "sigmoid": 5,
    "tanh": 6,
    "relu2": 7,
    "mish": 8,
    "elu": 9,
    "leaky_relu": 10,
}

# The constants sqrt(2 / pi) = 0.7978845608028654, 1 / sqrt(2) = 0.7071067811865476 and
# 1 / sqrt(2 pi) = 0.3989422804014327 are written inline: compiled Triton rejects plain Python
# globals inside @triton.jit functions (the interpreter does not check, so CI would not notice),
# and the interpreter cannot multiply by tl.constexpr globals.


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _softplus(x):
    # torch's softplus: linear above 20, where exp would overflow and log(1 + e^x) == x anyway
    return tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(tl.minimum(x, 20.0))))


@triton.jit
def act_forward(x, ACT: tl.constexpr):
    """act(x) for the activation with code ACT (x in float32)."""
    if ACT == 0:
        y = tl.maximum(x, 0.0)
    elif ACT == 1:
        y = 0.5 * x * (1.0 + tl.erf(x * 0.7071067811865476))
    elif ACT == 2:
        y = 0.5 * x * (1.0 + _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x)))
    elif ACT == 3:
        y = x * tl.sigmoid(x)
    elif ACT == 4:
        y = x * tl.sigmoid(1.702 * x)
    elif ACT == 5:
        y = tl.sigmoid(x)
    elif ACT == 6:
        y = _tanh(x)
    elif ACT == 7:
        r = tl.maximum(x, 0.0)
        y = r * r
    elif ACT == 8:
        y = x * _tanh(_softplus(x))
    elif ACT == 9:
        y = tl.where(x > 0.0, x, tl.exp(tl.minimum(x, 0.0)) - 1.0)
    else:
        y = tl.where(x > 0.0, x, 0.01 * x)
    return y


@triton.jit
def act_derivative(x, ACT: tl.constexpr):
    """d act(x) / dx for the activation with code ACT (x in float32)."""
    if ACT == 0:
        d = tl.where(x > 0.0, 1.0, 0.0)
    elif ACT == 1:
        d = 0.5 * (1.0 + tl.erf(x * 0.7071067811865476)) + x * 0.3989422804014327 * tl.exp(-0.5 * x * x)
    elif ACT == 2:
        t = _tanh(0.7978845608028654 * (x + 0.044715 * x * x * x))
        d = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * x * x)
    elif ACT == 3:
        s = tl.sigmoid(x)
        d = s * (1.0 + x * (1.0 - s))
    elif ACT == 4:
        s = tl.sigmoid(1.702 * x)
        d = s + 1.702 * x * s * (1.0 - s)
    elif ACT == 5:
        s = tl.sigmoid(x)
        d = s * (1.0 - s)
    elif ACT == 6:
        t = _tanh(x)
        d = 1.0 - t * t
    elif ACT == 7:
        d = 2.0 * tl.maximum(x, 0.0)
    elif ACT == 8:
        t = _tanh(_softplus(x))
        d = t + x * (1.0 - t * t) * tl.sigmoid(x)
    elif ACT == 9:
        d = tl.where(x > 0.0, 1.0, tl.exp(tl.minimum(x, 0.0)))
    else:
        d = tl.where(x > 0.0, 1.0, 0.01)
    return d
