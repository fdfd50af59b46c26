"""Turn the user's D(u), G(u) and T(t) (numbers, numpy functions, sympy expressions, torch networks) into
plain vectorised numpy functions."""

from __future__ import annotations

import numbers
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

__all__ = ["as_numpy_function", "as_time_function", "is_constant"]

_TORCH_BATCH = 1 << 18


def _is_sympy(obj: Any) -> bool:
    sympy = sys.modules.get("sympy")
    return sympy is not None and isinstance(obj, sympy.Basic)


def _is_torch_callable(obj: Any) -> bool:
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(obj, torch.nn.Module)


class _Constant:
    """A constant function; ``value`` is exposed so solvers can take fast paths."""

    def __init__(self, value: float, name: str) -> None:
        self.value = float(value)
        self.name = name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return np.full(np.shape(x), self.value)

    def __repr__(self) -> str:
        return f"{self.name} = {self.value:g}"


def is_constant(f: Callable) -> bool:
    return isinstance(f, _Constant)


def _torch_eval(module: Callable, x: np.ndarray) -> np.ndarray:
    import torch

    dtype = torch.float32
    if isinstance(module, torch.nn.Module):
        p = next(iter(module.parameters()), None)
        if p is not None and p.dtype.is_floating_point:
            dtype = p.dtype
    flat = np.ascontiguousarray(np.reshape(x, -1))
    out = np.empty(flat.shape, dtype=np.float64)
    with torch.no_grad():
        for start in range(0, flat.size, _TORCH_BATCH):
            chunk = torch.as_tensor(flat[start:start + _TORCH_BATCH], dtype=dtype).reshape(-1, 1)
            y = module(chunk)
            if not isinstance(y, torch.Tensor):
                y = torch.as_tensor(y)
            y = y.detach().to("cpu", torch.float64).reshape(-1)
            if y.numel() == 1:
                out[start:start + chunk.shape[0]] = float(y)
            elif y.numel() == chunk.shape[0]:
                out[start:start + chunk.shape[0]] = y.numpy()
            else:
                raise ValueError(f"the torch callable returned {y.numel()} values for {chunk.shape[0]} inputs; "
                                 "it must map an (N, 1) tensor to N values")
    return out.reshape(np.shape(x))


class _Wrapped:
    """A user callable made numpy-in, numpy-out (float64, same shape as the input)."""

    def __init__(self, f: Callable, name: str, torch_mode: bool | None) -> None:
        self.f = f
        self.name = name
        self.torch_mode = torch_mode  # None: decide on the first call

    def _numpy_call(self, x: np.ndarray) -> np.ndarray:
        y = self.f(x)
        torch = sys.modules.get("torch")
        if torch is not None and isinstance(y, torch.Tensor):
            raise TypeError("returned a tensor")
        return np.asarray(y, dtype=np.float64)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=np.float64)
        if self.torch_mode:
            y = _torch_eval(self.f, x)
        elif self.torch_mode is None:
            try:
                y = self._numpy_call(x)
                self.torch_mode = False
            except (TypeError, AttributeError, RuntimeError) as numpy_error:
                if "torch" not in sys.modules:
                    raise
                try:
                    y = _torch_eval(self.f, x)
                except Exception:
                    raise numpy_error from None
                self.torch_mode = True
        else:
            y = self._numpy_call(x)
        if y.shape != x.shape:
            try:
                y = np.broadcast_to(y, x.shape).astype(np.float64)
            except ValueError:
                raise ValueError(f"{self.name} returned shape {y.shape} for input shape {x.shape}; "
                                 "it must be vectorised (elementwise)") from None
        return y

    def __repr__(self) -> str:
        return f"{self.name} = {self.f!r}"


def _lambdify(expr: Any, name: str, var: str) -> Callable | _Constant:
    import sympy

    free = sorted(expr.free_symbols, key=str)
    if not free:
        return _Constant(float(expr), name)
    if len(free) > 1:
        names = ", ".join(map(str, free))
        raise ValueError(f"{name}: the sympy expression has free symbols {names}; it may depend only on "
                         f"{var!r} (substitute the parameter values first, e.g. expr.subs({{...}}))")
    fn = sympy.lambdify(free[0], expr, modules="numpy")
    return _Wrapped(fn, name, torch_mode=False)


def as_numpy_function(f: Any, name: str = "D(u)", var: str = "u") -> Callable[[np.ndarray], np.ndarray]:
    """Wrap a number, numpy callable, sympy expression (in one symbol, normally ``u``) or torch network
    as ``f(x: ndarray) -> ndarray`` of the same shape, float64.

    Torch modules (and callables that only accept tensors) are evaluated batched under ``torch.no_grad()``
    on ``(N, 1)`` float tensors of the module's dtype (float32 if it has no parameters).
    """
    if f is None:
        raise ValueError(f"{name} is None; give a number, a function, a sympy expression or a torch module")
    if isinstance(f, (_Constant, _Wrapped)):
        return f
    if isinstance(f, numbers.Real) and not isinstance(f, bool):
        return _Constant(float(f), name)
    if isinstance(f, np.ndarray) and f.ndim == 0:
        return _Constant(float(f), name)
    if _is_sympy(f):
        return _lambdify(f, name, var)
    if _is_torch_callable(f):
        return _Wrapped(f, name, torch_mode=True)
    if callable(f):
        return _Wrapped(f, name, torch_mode=None)
    raise TypeError(f"{name} must be a number, a vectorised callable, a sympy expression or a torch module; "
                    f"got {type(f).__name__}")


def as_time_function(T: Any) -> Callable[[float], float] | None:
    """Wrap the delay factor T(t) (t in hours; number, callable, sympy expression in ``t`` or torch
    module) as ``T(t: float) -> float``; ``None`` stays ``None`` (meaning T = 1)."""
    if T is None:
        return None
    f = as_numpy_function(T, "T(t)", "t")
    if is_constant(f):
        value = f.value  # type: ignore[attr-defined]
        return lambda t: value

    def time_factor(t: float) -> float:
        return float(np.reshape(f(np.array([t], dtype=np.float64)), -1)[0])

    return time_factor
