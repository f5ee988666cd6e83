"""Facts about the running environment (``lpeer info``)."""

from __future__ import annotations

import platform

import torch


def faiss_info() -> dict:
    try:
        import faiss
    except ImportError:
        return {"faiss": None, "faiss_gpus": 0}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return {"faiss": faiss.__version__, "faiss_gpus": int(gpus)}


def info() -> dict:
    """Versions and hardware: what a bug report needs."""
    from . import __version__

    try:
        import datasets

        datasets_version = datasets.__version__
    except ImportError:  # pragma: no cover - a hard dependency, but info must never crash
        datasets_version = None
    cuda = torch.cuda.is_available()
    return {
        "lifelong_peer": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "datasets": datasets_version,
        **faiss_info(),
        "threads": torch.get_num_threads(),
        "cuda": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }
