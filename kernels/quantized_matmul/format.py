"""`BlockQuantized`: a weight matrix kept in GGUF's block-quantized form.

Blocks of 32 weights along the input axis, each with an fp16 scale (and for 4-bit an fp16
offset), exactly as GGUF's Q4_1 and Q8_0 store them; only the layout is split into arrays
(codes, scales, offsets) so it is a pytree. Rows are the matrix's *outputs*: `q[n]` holds
the weights that make output n, which is what a matrix-vector product streams.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp

BLOCK = 32
FORMATS = ("q4", "q8")  # q4 = GGUF Q4_1 (w = d * q + m), q8 = GGUF Q8_0 (w = d * q)
LANES = 16  # output columns side by side in the lane copy (`LaneCodes`)


@flax.struct.dataclass
class LaneCodes:
    """The same codes, scales and offsets in the lane layout (`lanes.py`, and `cpu_int8.cc` for
    why): `q` [..., out / 16, in / 32, quads, 16, 4] (8 quads for q8, 4 for q4's nibble pairs),
    scales and offsets fp16 [..., out / 16, in / 32, 16]. `int8_activations`: products that read
    this copy quantize x to int8 (`cpu_int8.cc`); otherwise they stay fp32 (`cpu_kernel.cc`)."""

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    int8_activations: bool = flax.struct.field(pytree_node=False, default=True)


@flax.struct.dataclass
class BlockQuantized:
    """A matrix [out, in] as blocks of 32 along `in`; leading axes (stacked layers) allowed.

    q4: `q` uint8 [..., out, in / 32, 16], byte j holds element j (low nibble) and j + 16
    (high nibble); `offset` fp16 [..., out, in / 32]. q8: `q` int8 [..., out, in / 32, 32],
    `offset` None. `scale` fp16 [..., out, in / 32] in both.

    `lanes`: optionally, a second copy in the lane layout (`lanes.with_lanes`); only
    decode-sized products read it, everything else the blocks.

    `layer`: set on a matrix whose arrays are a stack of layers ([L, out, ...]) to mean layer
    `layer` of it (`at_layer`). The CPU kernels read that layer in place, at an offset, so an
    unrolled decoder hands every layer the same stacked buffers instead of a sliced copy
    each; the jnp paths slice it (`sliced`).
    """

    q: jax.Array
    scale: jax.Array
    offset: jax.Array | None
    format: str = flax.struct.field(pytree_node=False)
    lanes: LaneCodes | None = None
    layer: int | None = flax.struct.field(pytree_node=False, default=None)

    def at_layer(self, i: int) -> BlockQuantized:
        """Layer i of a stacked matrix, without slicing its arrays."""
        if self.layer is not None or self.q.ndim != 4 or not 0 <= i < self.q.shape[0]:
            shape = tuple(self.q.shape)
            raise ValueError(f"at_layer({i}) needs a stack of layers [L, out, in / 32, width], got {shape}")
        return self.replace(layer=i)

    def sliced(self) -> BlockQuantized:
        """The matrix with the arrays of its `layer` alone (a slice in the program); itself when
        it is not a layer view."""
        if self.layer is None:
            return self
        return jax.tree.map(lambda a: a[self.layer], self).replace(layer=None)

    @property
    def out_features(self) -> int:
        return self.q.shape[-3]

    @property
    def in_features(self) -> int:
        return self.q.shape[-2] * BLOCK

    @property
    def dtype(self):
        """The dtype its products compute and return: fp32 (what the blocks expand to)."""
        return jnp.dtype(jnp.float32)

    @property
    def nbytes(self) -> int:
        return sum(a.size * a.dtype.itemsize for a in jax.tree.leaves(self))


def is_block_quantized(x) -> bool:
    """Whether `x` is a BlockQuantized matrix (the `is_leaf` of tree maps that treat one whole)."""
    return isinstance(x, BlockQuantized)


def check(w: BlockQuantized) -> None:
    if w.format not in FORMATS:
        raise ValueError(f"unknown block-quantized format {w.format!r} (known: {', '.join(FORMATS)})")
    per_block = BLOCK // 2 if w.format == "q4" else BLOCK
    want_dtype = jnp.uint8 if w.format == "q4" else jnp.int8
    if w.q.ndim < 3 or w.q.shape[-1] != per_block or w.q.dtype != want_dtype:
        raise ValueError(
            f"{w.format} codes must be {jnp.dtype(want_dtype).name} [..., out, in/32, {per_block}], "
            f"got {w.q.dtype} {tuple(w.q.shape)}"
        )
    if w.scale.shape != w.q.shape[:-1] or (w.offset is not None and w.offset.shape != w.q.shape[:-1]):
        raise ValueError(f"scale/offset must be {tuple(w.q.shape[:-1])}")
    if (w.offset is None) != (w.format == "q8"):
        raise ValueError("q4 needs an offset array, q8 has none")
    if w.lanes is not None:
        *lead, n, blocks, width = w.q.shape
        lanes = w.lanes
        if (
            n % LANES
            or lanes.q.shape != (*lead, n // LANES, blocks, width // 4, LANES, 4)
            or lanes.q.dtype != w.q.dtype
            or lanes.scale.shape != (*lead, n // LANES, blocks, LANES)
            or (lanes.offset is None) != (w.offset is None)
        ):
            raise ValueError(f"the lane copy does not match its blocks {tuple(w.q.shape)} (make it with `pack_lanes`)")
