"""pyproject.toml installs exactly the package folders of the tree, all under `spanjax`."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_folder_is_installed_under_spanjax():
    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(tool["packages"])
    assert all(p == "spanjax" or p.startswith("spanjax.") for p in listed)
    found = set()
    for pkg, folder in tool["package-dir"].items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder).parts
            name = ".".join((pkg, *rel))
            # spanjax/ itself never holds the mapped folders; they install from the top level.
            if not any(name == m or name.startswith(m + ".") for m in tool["package-dir"] if len(m) > len(pkg)):
                found.add(name)
    assert listed == found, f"pyproject packages {sorted(listed - found)} extra, {sorted(found - listed)} missing"


def test_the_kernel_sources_are_installed_with_their_packages():
    """A non-editable install builds the C++ kernels from the installed files: every source and
    header `cpu_library` compiles must be package data of the package that holds it."""
    from spanjax.kernels import cpu_library

    tool = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    data = {
        ROOT
        / tool["package-dir"]["spanjax.kernels"]
        / pkg.removeprefix("spanjax.kernels").lstrip(".").replace(".", "/")
        / f
        for pkg, files in tool["package-data"].items()
        if pkg.startswith("spanjax.kernels")
        for f in files
    }
    needed = {Path(p).resolve() for p in (*cpu_library.SOURCES, *cpu_library.HEADERS)}
    assert needed <= {p.resolve() for p in data}, sorted(str(p) for p in needed - {p.resolve() for p in data})
    assert all(p.exists() for p in data), sorted(str(p) for p in data if not p.exists())


def test_a_source_checkout_runs_without_installing(tmp_path):
    """PYTHONPATH=<checkout> (no install, no site-packages) still maps the top-level folders."""
    code = "import spanjax.training, spanjax.eval; print(spanjax.training.__file__); print(spanjax.eval.__file__)"
    env = {"PYTHONPATH": str(ROOT), "PATH": os.environ.get("PATH", "")}
    out = subprocess.run([sys.executable, "-S", "-c", code], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [str(ROOT / "training" / "__init__.py"), str(ROOT / "eval" / "__init__.py")]


def test_test_files_have_unique_basenames():
    """pytest imports test files as top-level modules (no __init__.py): two files with one
    name in different folders stop the whole suite at collection."""
    import collections
    from pathlib import Path

    names = collections.Counter(p.name for p in Path(__file__).parent.rglob("test_*.py"))
    assert not [n for n, c in names.items() if c > 1]
