"""lifelong-peer: continual learning for language models with growable PEER expert pools."""

import importlib
import sys
import types

from .errors import CheckpointError, UserError

__version__ = "0.1.0"

__all__ = [
    "PEER",
    "CheckpointError",
    "LanguageModel",
    "ModelConfig",
    "PEERConfig",
    "UserError",
    "__version__",
    "attach",
]

#: names loaded on first use, from these modules: importing the package — every ``lpeer`` command does,
#: ``--help`` too — loads no torch (issue 25: each command took ~4 s)
_LAZY = {"attach": "attach", "LanguageModel": "model", "ModelConfig": "model", "PEER": "peer", "PEERConfig": "peer"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


class _Package(types.ModuleType):
    """``lifelong_peer.attach`` is the function: the import system, loading the submodule of that name,
    sets the package's attribute to the module; the function is kept instead."""

    def __setattr__(self, name: str, value) -> None:
        if name == "attach" and isinstance(value, types.ModuleType):
            value = value.attach
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
