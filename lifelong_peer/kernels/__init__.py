"""Native CPU kernels of the PEER layer (issue 8): compiled from ``peer_kernels.cpp`` at first use.

``load()`` returns the compiled module, or ``None`` when the kernels are unavailable — switched off
with ``LPEER_NATIVE=0``, no C++ compiler, or a failed build — and ``lifelong_peer.peer_ops`` then
runs its pure-PyTorch code. The build (``torch.utils.cpp_extension``, about a minute, announced on
stderr) is cached under ``~/.cache/lifelong_peer/kernels/<key>`` (``$LPEER_CACHE`` overrides the
root), the key hashing the source, torch's version, the flags and this CPU's instruction sets (the
build uses ``-march=native``; ``LPEER_NATIVE_MARCH`` names another target, e.g. ``x86-64-v3`` for one
cache shared by mixed CPUs), so later processes only load the library (``python -m
lifelong_peer.kernels`` builds it ahead). Processes starting together (torchrun's ranks) build once,
under an flock on the cache, and the others load the result; the build runs in a private folder
renamed into place when complete, so an interrupted build leaves nothing half-made (nor
cpp_extension's own lock file, which would make the next build wait forever). A failed build
leaves ``FAILED`` with the compiler's message in the cache folder and is not retried; delete the
folder to retry.

Issue 25: the kernels' own arithmetic gives the same bits whatever instruction set the build targets —
no fused multiply-adds (``-ffp-contract=off``) and reductions in a fixed order (``dot``), checked by
``tests/test_native.py`` against a baseline x86-64 build. What they call in ATen (the GEMM of the
routing scores, the activation) follows the CPU, as torch's own layers do: ``build_info`` and
``system.machine`` record both in every results file.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import importlib.util
import os
import platform
import shutil
import sys
import sysconfig
import tempfile
import warnings
from importlib import metadata
from pathlib import Path
from types import ModuleType

SOURCE = Path(__file__).with_name("peer_kernels.cpp")
MARCH_ENV = "LPEER_NATIVE_MARCH"
#: -ffp-contract=off: no fused multiply-add, whose rounding would differ between CPUs with and without FMA
CFLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fno-math-errno", "-std=c++17"]
LDFLAGS = ["-fopenmp"]


def cflags() -> list[str]:
    """The compile flags: ``CFLAGS``, the target taken from ``$LPEER_NATIVE_MARCH`` when set."""
    march = os.environ.get(MARCH_ENV)
    return [f"-march={march}" if f == "-march=native" and march else f for f in CFLAGS]


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
    key = "\n".join([SOURCE.read_text(), _torch_version(), sys.version, " ".join(cflags()), _cpu_flags()])
    root = Path(os.environ.get("LPEER_CACHE", Path.home() / ".cache" / "lifelong_peer"))
    return root / "kernels" / hashlib.sha256(key.encode()).hexdigest()[:16]


def _torch_version() -> str:
    """torch's version without importing it (``lpeer info`` starts without torch, issue 25): the same string
    as ``torch.__version__`` for an installed torch."""
    if "torch" in sys.modules:
        return sys.modules["torch"].__version__
    return metadata.version("torch")


def _compiler() -> str | None:
    return shutil.which(os.environ.get("CXX", "c++"))


def compiler_available() -> bool:
    """Whether a C++ compiler ($CXX, else c++) is on PATH to build the kernels with."""
    return _compiler() is not None


def _library(d: Path) -> Path:
    """The compiled library in cache folder ``d`` (cpp_extension names it after the module)."""
    return d / f"lpeer_kernels_{d.name}.so"


def is_built() -> bool:
    """Whether a compiled library is already cached (loading it then takes well under a second)."""
    return _library(build_dir()).exists()


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernels (built on first call, then cached on disk), or ``None`` — see the module docstring."""
    if not enabled() or sys.platform == "win32":
        return None
    d = build_dir()
    name = f"lpeer_kernels_{d.name}"
    if (found := _from_cache(name, d)) is not _ABSENT:
        return found
    if _compiler() is None:
        return None  # nothing to build with: the pure-PyTorch path, silently
    return _build_once(name, d)


_ABSENT = object()


def _from_cache(name: str, d: Path):
    """The cached library; ``None`` after a failed build or for a damaged library (with a warning);
    ``_ABSENT`` when nothing is cached yet."""
    failed = d / "FAILED"
    if failed.exists():
        warnings.warn(
            f"native PEER kernels: an earlier build failed (see {failed}); using the pure-PyTorch path", stacklevel=3
        )
        return None
    if not _library(d).exists():
        return _ABSENT
    try:
        return _import(name, _library(d))
    except (ImportError, OSError) as exc:  # a damaged cache must not break the layer either
        warnings.warn(
            f"native PEER kernels: cannot load {_library(d)} ({exc}); using the pure-PyTorch path "
            f"(delete {d} to rebuild)",
            stacklevel=3,
        )
        return None


def _build_once(name: str, d: Path) -> ModuleType | None:
    """Build under a lock on the cache, so that processes starting together (torchrun's ranks on one
    machine) compile once — not K compilers at once, each a GB of memory — and the others load the
    result. An flock dies with its process, so a killed build leaves no stale lock."""
    import fcntl  # POSIX only, as the build (load() returns None on Windows)

    try:
        d.parent.mkdir(parents=True, exist_ok=True)
        lock = open(d.parent / f".{d.name}.lock", "w")  # noqa: SIM115 (closed by the with below)
    except OSError as exc:  # a read-only or full cache: nowhere to build, so the pure-PyTorch path
        warnings.warn(
            f"native PEER kernels: cannot write the build cache {d.parent} ({exc.strerror or exc}); "
            "using the pure-PyTorch path (set LPEER_CACHE to a writable folder)",
            stacklevel=3,
        )
        return None
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (found := _from_cache(name, d)) is not _ABSENT:  # another process finished while we waited
            return found
        return _build(name, d)


def _import(name: str, path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _build(name: str, d: Path) -> ModuleType | None:
    from torch.utils.cpp_extension import load as build

    print(
        "lifelong-peer: compiling the native PEER kernels (once per machine, about a minute; "
        "LPEER_NATIVE=0 skips them)",
        file=sys.stderr,
        flush=True,
    )
    try:
        private = Path(tempfile.mkdtemp(prefix=f".{d.name}.", dir=d.parent))
        private.chmod(0o755)  # as a plain mkdir would make it (mkdtemp's folder is private)
    except OSError as exc:  # a full cache: nowhere to build, so the pure-PyTorch path
        warnings.warn(
            f"native PEER kernels: cannot write the build cache {d.parent} ({exc.strerror or exc}); "
            "using the pure-PyTorch path (set LPEER_CACHE to a writable folder)",
            stacklevel=3,
        )
        return None
    # cpp_extension looks for ninja on PATH; the pip-installed one sits next to this interpreter
    path = os.environ.get("PATH", "")
    os.environ["PATH"] = os.pathsep.join([sysconfig.get_path("scripts"), path])
    try:
        module = build(
            name=name,
            sources=[str(SOURCE)],
            build_directory=str(private),
            extra_cflags=cflags(),
            extra_ldflags=LDFLAGS,
            verbose=False,
        )
    except Exception as exc:  # a broken toolchain must never break the layer: fall back
        # remember the failure (not retried) where the cache allows — unless another process built it
        with contextlib.suppress(OSError):
            d.mkdir(exist_ok=True)
            if not _library(d).exists():
                (d / "FAILED").write_text(f"{type(exc).__name__}: {exc}\n")
        warnings.warn(
            f"native PEER kernels failed to build ({type(exc).__name__}); using the pure-PyTorch path", stacklevel=2
        )
        return None
    else:
        # atomic: the folder appears complete or not at all; if another process got there first
        # (or d holds FAILED), theirs stays
        with contextlib.suppress(OSError):
            private.rename(d)
        return module
    finally:  # whatever is left: a failed or interrupted build, or the loser of a race
        os.environ["PATH"] = path
        shutil.rmtree(private, ignore_errors=True)


def build_info() -> dict:
    """The kernels a results record was computed with (issue 25): ``native`` (False: the pure-PyTorch path), the
    compile ``flags`` and ``isa``, the instruction sets the build targets (the compiler's macros: AVX2, FMA, ...).
    Builds nothing: kernels not built yet count as not used."""
    module = load() if enabled() and is_built() else None
    if module is None:
        return {"native": False, "flags": None, "isa": None}
    return {"native": True, "flags": " ".join(cflags()), "isa": module.build_isa()}


__all__ = ["build_dir", "build_info", "cflags", "compiler_available", "enabled", "is_built", "load"]
