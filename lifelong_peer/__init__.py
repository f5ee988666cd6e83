"""lifelong-peer: continual learning for language models with growable PEER expert pools."""

from .attach import attach
from .errors import CheckpointError, UserError
from .model import LanguageModel, ModelConfig
from .peer import PEER, PEERConfig

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
