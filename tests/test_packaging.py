"""pyproject.toml installs exactly the package folders of the tree, all under `spanjax`."""

from __future__ import annotations

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
