"""The op registry: every hot operation has a name and one or more backends.

A backend is a function with the op's signature plus a `supports(*args, **kwargs) -> bool`
predicate. `call(op, ...)` picks, in this order:

1. the innermost `use(...)` choice for that op (a context manager; restored on exit, also on
   an exception),
2. the global default set with `set_default(...)`,
3. the highest-priority registered backend whose `supports` accepts the inputs
   (`triton` for CUDA tensors, or CPU tensors under TRITON_INTERPRET=1; else `torch`).

An explicit choice that does not support the inputs is an error, never a silent fallback.

    >>> from llama4_fast import registry
    >>> registry.available()["fused_moe"]
    ['triton', 'torch']
    >>> with registry.use(fused_moe="torch"):
    ...     out = llama4_fast.ops.fused_moe(x, w13, w2, weights, ids)
"""

from __future__ import annotations

import collections
import contextlib
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Backend:
    op: str
    name: str
    fn: Callable
    supports: Callable[..., bool]
    priority: int


_BACKENDS: dict[str, dict[str, Backend]] = {}
_DEFAULTS: dict[str, str] = {}
# Stack of {op: backend} choices pushed by `use`. A plain list, not a ContextVar: dynamo guards
# on module globals cheaply but graph-breaks on ContextVar.get.
_CHOICES: list[dict[str, str]] = []
ALL = "*"  # key under which `use("torch")` stores a choice for every op


def _always(*args, **kwargs) -> bool:
    return True


def register(op: str, backend: str, fn: Callable | None = None, *, supports: Callable[..., bool] = _always,
             priority: int = 0):
    """Register `fn` as backend `backend` of op `op`. Usable as a decorator when `fn` is None.

    Higher `priority` is tried first when nothing is chosen explicitly. Re-registering the same
    (op, backend) replaces it, so a user can override a built-in backend.
    """
    def add(f):
        _BACKENDS.setdefault(op, {})[backend] = Backend(op, backend, f, supports, priority)
        return f

    return add if fn is None else add(fn)


def available() -> dict[str, list[str]]:
    """{op: [backend names, most preferred first]} for every registered op."""
    _load_builtin_backends()
    return {op: [b.name for b in _ordered(op)] for op in sorted(_BACKENDS)}


def _ordered(op: str) -> list[Backend]:
    # sorted() is stable: equal priorities keep registration order
    return sorted(_BACKENDS[op].values(), key=lambda b: -b.priority)


def _check_op(op: str):
    if op not in _BACKENDS:
        raise KeyError(f"unknown op {op!r}; registered ops: {sorted(_BACKENDS)}")


def _check_backend(op: str, backend: str):
    _check_op(op)
    if backend not in _BACKENDS[op]:
        raise KeyError(f"op {op!r} has no backend {backend!r}; it has: {[b.name for b in _ordered(op)]}")


def _validated(choices: dict[str, str], all_backend: str | None) -> dict[str, str]:
    _load_builtin_backends()
    resolved = {}
    if all_backend is not None:
        if not any(all_backend in b for b in _BACKENDS.values()):
            names = sorted({n for b in _BACKENDS.values() for n in b})
            raise KeyError(f"no op has a backend {all_backend!r}; known backends: {names}")
        resolved[ALL] = all_backend
    for op, backend in choices.items():
        _check_backend(op, backend)
        resolved[op] = backend
    return resolved


@contextlib.contextmanager
def use(all_ops: str | None = None, /, **choices: str):
    """Choose backends inside a `with` block: `use(fused_moe="torch")`, or `use("torch")` for
    every op that has a backend of that name. Nested blocks override outer ones."""
    _CHOICES.append(_validated(choices, all_ops))
    try:
        yield
    finally:
        _CHOICES.pop()


def set_default(all_ops: str | None = None, /, **choices: str):
    """Set global backend choices (same forms as `use`); `clear_defaults()` removes them."""
    resolved = _validated(choices, all_ops)
    _DEFAULTS.update(resolved)


def clear_defaults():
    _DEFAULTS.clear()


def _explicit_choice(op: str) -> str | None:
    for layer in (*reversed(_CHOICES), _DEFAULTS):
        if op in layer:
            return layer[op]
        if ALL in layer and layer[ALL] in _BACKENDS[op]:
            return layer[ALL]
    return None


def select(op: str, *args, **kwargs) -> Backend:
    """The backend that `call` would run for these arguments."""
    _load_builtin_backends()
    _check_op(op)
    chosen = _explicit_choice(op)
    if chosen is not None:
        backend = _BACKENDS[op][chosen]
        if not backend.supports(*args, **kwargs):
            raise RuntimeError(f"backend {chosen!r} of op {op!r} was chosen explicitly but does not support "
                               f"these inputs ({_describe(args)}); choose another with registry.use({op}=...)")
        return backend
    for backend in _ordered(op):
        if backend.supports(*args, **kwargs):
            return backend
    raise RuntimeError(f"no backend of op {op!r} supports these inputs ({_describe(args)}); "
                       f"registered: {[b.name for b in _ordered(op)]}")


_RECORDERS: list[collections.Counter] = []


@contextlib.contextmanager
def record():
    """Count the dispatches made inside the block: yields a Counter of (op, backend) -> calls.
    Shows which backend actually ran, e.g. that a patched model reached the fused MoE."""
    counts: collections.Counter = collections.Counter()
    _RECORDERS.append(counts)
    try:
        yield counts
    finally:
        _RECORDERS.remove(counts)


def call(op: str, *args, **kwargs):
    backend = select(op, *args, **kwargs)
    for counts in _RECORDERS:
        counts[(op, backend.name)] += 1
    return backend.fn(*args, **kwargs)


def _describe(args) -> str:
    import torch

    parts = [f"{a.dtype} {a.device.type} {tuple(a.shape)}" for a in args if isinstance(a, torch.Tensor)]
    return "; ".join(parts) or "no tensors"


_builtin_loaded = False


def _load_builtin_backends():
    # Imported lazily: the backends import torch/triton machinery that `registry` itself need not.
    global _builtin_loaded
    if not _builtin_loaded:
        _builtin_loaded = True
        from llama4_fast.backends import sdpa, torch_ref, triton_ops  # noqa: F401 (registers on import)
