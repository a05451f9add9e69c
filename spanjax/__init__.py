"""spanjax: span queries over a paged, content-addressed KV cache, in JAX and Pallas.

The repository's top-level folders kernels/, training/ and eval/ are the subpackages
spanjax.kernels, spanjax.training and spanjax.eval (pyproject's package-dir). An install
(editable or not) maps them; the finder below does the same for a source checkout run
without installing (`PYTHONPATH=<checkout>`, as on a machine with no package index).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

_CHECKOUT = Path(__file__).resolve().parents[1]
_TOP_LEVEL_FOLDERS = ("kernels", "training", "eval")


class _CheckoutFolders(importlib.abc.MetaPathFinder):
    """Finds spanjax.<folder> in the checkout; consulted only after every installed finder."""

    def find_spec(self, fullname, path=None, target=None):
        parent, _, name = fullname.rpartition(".")
        init = _CHECKOUT / name / "__init__.py"
        if parent != __name__ or name not in _TOP_LEVEL_FOLDERS or not init.is_file():
            return None
        return importlib.util.spec_from_file_location(fullname, init, submodule_search_locations=[str(init.parent)])


if (_CHECKOUT / "pyproject.toml").is_file() and not any(isinstance(f, _CheckoutFolders) for f in sys.meta_path):
    sys.meta_path.append(_CheckoutFolders())
