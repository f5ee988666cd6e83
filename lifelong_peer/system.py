"""Facts about the running environment (``lpeer info``)."""

from __future__ import annotations

import platform


def faiss_info() -> dict:
    try:
        import faiss
    except ImportError:
        return {"faiss": None, "faiss_gpus": 0}
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    return {"faiss": faiss.__version__, "faiss_gpus": int(gpus)}


def native_kernels_info() -> str:
    """Whether the PEER layer's C++ kernels run here: "built", "not built yet" (the next PEER layer
    compiles them), "off" (LPEER_NATIVE=0), "failed" (see the cache folder) or "no compiler"."""
    from . import kernels

    if not kernels.enabled():
        return "off (LPEER_NATIVE=0)"
    if (kernels.build_dir() / "FAILED").exists():  # as kernels.load(): a failed build is not retried
        return f"failed ({kernels.build_dir() / 'FAILED'})"
    if kernels.is_built():
        return f"built ({kernels.build_dir()})"
    return "not built yet (compiled at first use)" if kernels.compiler_available() else "no C++ compiler: pure PyTorch"


def info() -> dict:
    """Versions and hardware: what a bug report needs.

    torch is imported (threads, CUDA), datasets is not: its version is read from the installed
    package's metadata, as importing it takes longer than the rest of ``lpeer info`` (issue 25)."""
    from importlib import metadata

    import torch

    from . import __version__

    try:
        datasets_version = metadata.version("datasets")
    except metadata.PackageNotFoundError:  # pragma: no cover - a hard dependency, but info must never crash
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
        "native_kernels": native_kernels_info(),
        "cuda": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }
