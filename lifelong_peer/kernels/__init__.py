"""Native CPU kernels of the PEER layer (issue 8): compiled from ``peer_kernels.cpp`` at first use.

``load()`` returns the compiled module, or ``None`` when the kernels are unavailable — switched off
with ``LPEER_NATIVE=0``, no C++ compiler, or a failed build — and ``lifelong_peer.peer_ops`` then
runs its pure-PyTorch code. The build (``torch.utils.cpp_extension``, about a minute) is cached
under ``~/.cache/lifelong_peer/kernels/<key>`` (``$LPEER_CACHE`` overrides the root), the key
hashing the source, torch's version, the flags and this CPU's instruction sets (the build uses
``-march=native``), so later processes only load the library. A failed build leaves
``FAILED`` with the compiler's message in that folder and is not retried; delete the folder to
retry.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).with_name("peer_kernels.cpp")
CFLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-std=c++17"]
LDFLAGS = ["-fopenmp"]


def enabled() -> bool:
    """Whether the environment allows the native kernels (``LPEER_NATIVE=0`` switches them off)."""
    return os.environ.get("LPEER_NATIVE", "1") != "0"


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def build_dir() -> Path:
    """The cache folder of this source, torch version, flag set and CPU."""
    key = "\n".join([SOURCE.read_text(), torch.__version__, sys.version, " ".join(CFLAGS), _cpu_flags()])
    root = Path(os.environ.get("LPEER_CACHE", Path.home() / ".cache" / "lifelong_peer"))
    return root / "kernels" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def is_built() -> bool:
    """Whether a compiled library is already cached (loading it then takes well under a second)."""
    d = build_dir()
    return any(d.glob(f"lpeer_kernels_{d.name}*.so"))


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (built on first call, then cached on disk), or ``None`` — see the module docstring."""
    if not enabled() or sys.platform == "win32":
        return None
    d = build_dir()
    failed = d / "FAILED"
    if failed.exists():
        warnings.warn(
            f"native PEER kernels: an earlier build failed (see {failed}); using the pure-PyTorch path", stacklevel=2
        )
        return None
    if _compiler() is None:
        return None  # nothing to build with: the pure-PyTorch path, silently
    from torch.utils.cpp_extension import load as build

    d.mkdir(parents=True, exist_ok=True)
    try:
        return build(
            name=f"lpeer_kernels_{d.name}",
            sources=[str(SOURCE)],
            build_directory=str(d),
            extra_cflags=CFLAGS,
            extra_ldflags=LDFLAGS,
            verbose=False,
        )
    except Exception as exc:  # a broken toolchain must never break the layer: fall back
        failed.write_text(f"{type(exc).__name__}: {exc}\n")
        warnings.warn(
            f"native PEER kernels failed to build ({type(exc).__name__}); using the pure-PyTorch path", stacklevel=2
        )
        return None


__all__ = ["build_dir", "enabled", "is_built", "load"]
