"""Facts about the running environment (``lpeer info``), and the machine record every results file keeps."""

from __future__ import annotations

import platform
from pathlib import Path

#: CPU features that decide which code torch's and our kernels run (x86 and Arm), as /proc/cpuinfo names them
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "avx512f",
    "avx512bw",
    "avx512vl",
    "avx512_bf16",
    "amx_tile",
    "asimd",
    "sve",
)


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


def cpu() -> dict:
    """This CPU's model name and which of ``ISA_FLAGS`` it has."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("model name", "Model", "cpu model") and model in (platform.processor(), platform.machine()):
                model = value.strip()
            elif key in ("flags", "Features") and not flags:
                flags = set(value.split())
    except OSError:
        pass
    return {"model": model, "isa": [f for f in ISA_FLAGS if f in flags]}


def machine() -> dict:
    """Where a result was computed (issue 25): the CPU and its instruction sets, torch's threads and CPU code
    path (its GEMMs and vectorised ops follow the CPU), the PEER kernels' build (``kernels.build_info``) and any
    GPU — what another machine needs to know whether it should reproduce the numbers bit for bit or to a
    tolerance (README, "Reproducing numbers")."""
    import torch  # here, not at the top: `lpeer --help` and friends start without it (issue 25)

    from . import kernels

    cuda = torch.cuda.is_available()
    return {
        "cpu": cpu(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_kernels": kernels.build_info(),
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "platform": platform.platform(),
    }


def info(full: bool = False) -> dict:
    """Versions and hardware: what a bug report needs.

    By default nothing heavy is imported, so ``lpeer info`` answers at once (issue 25): versions come from the
    installed packages' metadata. ``full`` imports torch and faiss for torch's threads and CPU code path, CUDA
    devices, faiss GPUs and the kernels' instruction sets."""
    from . import __version__

    here = cpu()
    data = {
        "lifelong_peer": __version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "torch": _version("torch"),
        "datasets": _version("datasets"),
        "faiss": _version("faiss-cpu", "faiss-gpu", "faiss-gpu-cu12", "faiss-gpu-cu11", "faiss"),
        "cpu": f"{here['model']} ({' '.join(here['isa'])})",
        "native_kernels": native_kernels_info(),
    }
    if not full:
        return data | {"threads, CUDA, faiss GPUs": "lpeer info --full"}
    import torch

    from . import kernels

    cuda = torch.cuda.is_available()
    return data | {
        **faiss_info(),
        "threads": torch.get_num_threads(),
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "native_kernels_isa": kernels.build_info()["isa"],
        "cuda": cuda,
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
    }


def _version(*distributions: str) -> str | None:
    """The installed version of the first of ``distributions`` present (None: none is)."""
    from importlib import metadata

    for name in distributions:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None
