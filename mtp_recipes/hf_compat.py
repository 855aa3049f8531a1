"""Every use of a transformers internal (a private name, or a class change of its modules), in one place.

Each function below is one touch point and says why no public API serves. ``tests/test_hf_compat.py``
has one test per touch point whose failure message names it, so a new transformers release shows in one
test run exactly what moved.
"""

from __future__ import annotations

from torch import nn


def swap_class(module: nn.Module, cls: type[nn.Module]) -> None:
    """Make ``module`` an instance of ``cls``, a subclass of its own class that adds no state.

    transformers builds the backbone's modules itself; a subclass swapped in afterwards changes one method
    while parameters, state-dict keys, FSDP wrapping and transformers' ``isinstance``-based weight init
    all see the same module.
    """
    if not issubclass(cls, type(module)):
        raise TypeError(f"{cls.__name__} is not a subclass of {type(module).__name__}")
    module.__class__ = cls
