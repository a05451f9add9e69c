"""`PackedMatrix`: an fp32 weight matrix [in, out] packed in column panels for the CPU kernel.

Panel p holds output columns [48 p, 48 p + 48) for every input, contiguous: `panels`
[..., ceil(out / 48), in, 48], the last panel's missing columns zero. The same values as the
matrix, only laid out so that a product streams each panel once per tile of rows
(`cpu_kernel.cc` says why). Leading axes (stacked layers) are allowed, and `layer` marks a
view of one layer of a stack that the kernel reads in place (as `BlockQuantized.layer`).
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

PANEL = 48  # output columns per panel (`kPanel` in cpu_kernel.cc)


@flax.struct.dataclass
class PackedMatrix:
    panels: jax.Array  # fp32 [..., ceil(out / 48), in, 48]
    out_features: int = flax.struct.field(pytree_node=False)
    layer: int | None = flax.struct.field(pytree_node=False, default=None)

    def at_layer(self, i: int) -> PackedMatrix:
        """Layer i of a stacked matrix, without slicing its panels."""
        if self.layer is not None or self.panels.ndim != 4 or not 0 <= i < self.panels.shape[0]:
            raise ValueError(f"at_layer({i}) needs a stack of layers [L, panels, in, 48], got {self.panels.shape}")
        return self.replace(layer=i)

    def sliced(self) -> PackedMatrix:
        """The matrix with its `layer`'s panels alone (a slice in the program); itself when it
        is not a layer view."""
        return self if self.layer is None else PackedMatrix(self.panels[self.layer], self.out_features)

    @property
    def in_features(self) -> int:
        return self.panels.shape[-2]

    @property
    def dtype(self):
        return jnp.dtype(jnp.float32)

    @property
    def nbytes(self) -> int:
        return self.panels.size * self.panels.dtype.itemsize


def is_packed(x) -> bool:
    """Whether `x` is a PackedMatrix (the `is_leaf` of tree maps that treat one whole)."""
    return isinstance(x, PackedMatrix)


def pack(w) -> PackedMatrix:
    """w fp32 [..., in, out] -> its panels. Runs on the host (numpy): a one-time relayout."""
    w = np.asarray(w)
    if w.dtype != np.float32 or w.ndim < 2:
        raise ValueError(f"pack: needs an fp32 matrix [..., in, out], got {w.dtype} {w.shape}")
    *lead, k, n = w.shape
    padded = np.pad(w, [(0, 0)] * len(lead) + [(0, 0), (0, -n % PANEL)])
    panels = padded.reshape(*lead, k, -1, PANEL)
    panels = np.ascontiguousarray(np.moveaxis(panels, -2, -3))  # [..., panels, in, 48]
    return PackedMatrix(jnp.asarray(panels), n)


def unpack(w: PackedMatrix) -> jax.Array:
    """The matrix [..., in, out] of (a layer view's slice of) w."""
    w = w.sliced()
    *lead, p, k, width = w.panels.shape
    full = jnp.moveaxis(w.panels, -3, -2).reshape(*lead, k, p * width)
    return full[..., : w.out_features]
