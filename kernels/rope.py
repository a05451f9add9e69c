"""Rotary position embedding shared by models and kernels.

Convention: Hugging Face Llama's "rotate half" layout (the first half of the
head dimension pairs with the second half). GGUF checkpoints are permuted back
to this layout on load, so every model in spanjax uses it.
"""

import jax.numpy as jnp


def rope_tables(positions, inv_freq):
    """(cos, sin) [..., T, 1, D // 2] of `positions` [..., T]: `rotate` applies them."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)
    return jnp.cos(angles)[..., None, :], jnp.sin(angles)[..., None, :]


def rotate(x, cos, sin):
    """RoPE of `x` [..., T, H, D] with tables from `rope_tables` (fp32, cast back to x's dtype)."""
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def apply_rope(x, positions, inv_freq):
    """Rotate `x` [..., T, H, D] by `positions` [..., T] (int) with `inv_freq` [D // 2].

    Computed in fp32 and cast back, so keys rotated inside a kernel match keys
    rotated here bit for bit up to the final cast.
    """
    return rotate(x, *rope_tables(positions, inv_freq))
