"""All-or-nothing changes to a model.

`patch`, `quantize`, `load_quantized` and `shard_experts` change a model only by assigning
attributes (a submodule, a parameter, a buffer, an instance's forward, a config field), never
by writing into a tensor in place, and they make every assignment through one `Changes` log:

    with all_or_nothing() as changes:
        changes.set(parent, "experts", new_experts)      # records how to undo it
        ...                                               # any exception (Ctrl-C too) undoes all

so a call that fails at any point leaves the model exactly as it was: the same module objects,
the same parameter objects, the same forwards. The price is that what a call replaces stays
alive until the call completes.
"""

from __future__ import annotations

import contextlib

import torch.nn as nn

_SET, _DELETE = "set", "delete"


def _previous(obj, attr: str):
    """How to restore obj.attr: (_SET, value) or (_DELETE, None) for an attribute the instance
    does not hold itself (an instance forward over the class's, a new attribute)."""
    if isinstance(obj, nn.Module):
        for store in (obj._parameters, obj._buffers, obj._modules):
            if attr in store:
                return _SET, store[attr]
    if attr in vars(obj):
        return _SET, vars(obj)[attr]
    if isinstance(getattr(type(obj), attr, None), property):  # e.g. a config's _attn_implementation
        return _SET, getattr(obj, attr)
    return _DELETE, None


class Changes:
    """An undo log of attribute assignments; `rollback` undoes them in reverse order."""

    def __init__(self):
        self._undo: list[tuple[object, str, str, object]] = []

    def set(self, obj, attr: str, value):
        """setattr(obj, attr, value), remembering the previous state."""
        how, previous = _previous(obj, attr)
        setattr(obj, attr, value)
        self._undo.append((obj, attr, how, previous))

    def rollback(self):
        while self._undo:
            obj, attr, how, previous = self._undo.pop()
            if how == _SET:
                setattr(obj, attr, previous)
            else:
                delattr(obj, attr)

    def __len__(self) -> int:
        return len(self._undo)


@contextlib.contextmanager
def all_or_nothing():
    """Yield a new `Changes` log; if the block raises anything (KeyboardInterrupt included),
    undo every change made through it, then re-raise."""
    changes = Changes()
    try:
        yield changes
    except BaseException:
        changes.rollback()
        raise
