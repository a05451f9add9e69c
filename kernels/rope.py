"""Rotary position embedding shared by models and kernels.

Convention: Hugging Face Llama's "rotate half" layout (the first half of the
head dimension pairs with the second half). GGUF checkpoints are permuted back
to this layout on load, so every model in spanjax uses it.
"""

import jax.numpy as jnp


def apply_rope(x, positions, inv_freq):
    """Rotate `x` [..., T, H, D] by `positions` [..., T] (int) with `inv_freq` [D // 2].

    Computed in fp32 and cast back, so keys rotated inside a kernel match keys
    rotated here bit for bit up to the final cast.
    """
    angles = positions.astype(jnp.float32)[..., None] * inv_freq.astype(jnp.float32)  # [..., T, D/2]
    cos = jnp.cos(angles)[..., None, :]  # broadcast over heads
    sin = jnp.sin(angles)[..., None, :]
    xf = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    x1, x2 = xf[..., :half], xf[..., half:]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x.dtype)
