"""pyproject.toml ships every file of the package, and names every folder that holds one (issue 17).

setuptools warns (``Package 'lifelong_peer.assets' is absent from the packages configuration``) for
a folder of data files that is not a listed package, and leaves out of the wheel every folder that is
not listed (``lifelong_peer.kernels`` and its C++ source were missing). This is the rule it applies,
checked without building a wheel (a build needs setuptools >= 77 from the network).
"""

from __future__ import annotations

import fnmatch
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _setuptools() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]


def _shipped_files() -> dict[str, list[Path]]:
    """Dotted package name → the files in its folder (not below it), for every folder under a top package."""
    config = _setuptools()
    dirs = config["package-dir"]
    out: dict[str, list[Path]] = {}
    for top in ("lifelong_peer", "lifelong_peer.streams", "lifelong_peer.cli"):
        base = ROOT / dirs[top]
        for folder in [base, *(p for p in base.rglob("*") if p.is_dir())]:
            rel = folder.relative_to(base).parts
            if "__pycache__" in rel or any(part.startswith(".") for part in rel):
                continue
            if top == "lifelong_peer" and rel and rel[0] in ("streams", "cli"):  # mapped elsewhere
                continue
            files = [f for f in folder.iterdir() if f.is_file() and not f.name.startswith(".")]
            if files:
                out[".".join((top, *rel))] = files
    return out


def test_every_folder_with_files_is_a_listed_package():
    listed = set(_setuptools()["packages"])
    missing = sorted(set(_shipped_files()) - listed)
    assert not missing, f"folders that ship files but are not in [tool.setuptools] packages: {missing}"


def test_every_data_file_is_matched_by_package_data():
    patterns = _setuptools().get("package-data", {})
    unmatched = [
        str(f.relative_to(ROOT))
        for package, files in _shipped_files().items()
        for f in files
        if f.suffix != ".py" and not any(fnmatch.fnmatch(f.name, p) for p in patterns.get(package, []))
    ]
    assert not unmatched, f"files no package-data pattern ships: {unmatched}"
    assert "lifelong_peer.kernels" in _shipped_files()  # the test looks where the files are
