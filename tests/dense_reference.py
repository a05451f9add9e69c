"""Brute-force reference for span semantics: one dense forward over all prompt
tokens with an explicit [N, N] visibility mask and explicit positions.

Independent of pages, block tables and the kernel: keys are rotated by their
own positions and every query attends to exactly the keys the mask allows.
"""

import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels.rope import apply_rope
from spanjax.models import llama


def masked_dense_logits(params, cfg, tokens, positions, mask, scale=None, bias=None):
    """`scale`, `bias` [N, N] (optional): the logit of query i for key j is
    scale[i, j] * (q . k * sm_scale) + bias[i, j] before the mask and softmax."""
    tokens = jnp.asarray(tokens)[None]
    positions = jnp.asarray(positions)[None]
    mask = jnp.asarray(mask)
    inv_freq = jnp.asarray(cfg.rope_inv_freq())
    G = cfg.num_heads // cfg.num_kv_heads

    def attention(idx, layer_cache, q, k, v, pos):
        k = apply_rope(k, pos, inv_freq)
        B, T = pos.shape
        qg = q.reshape(B, T, cfg.num_kv_heads, G, cfg.head_dim)
        s = jnp.einsum("bthgd,bkhd->bhgtk", qg, k) * cfg.sm_scale
        if scale is not None:
            s = s * jnp.asarray(scale, jnp.float32)
        if bias is not None:
            s = s + jnp.asarray(bias, jnp.float32)
        s = jnp.where(mask[None, None, None], s, -jnp.inf)
        p = jax.nn.softmax(s, axis=-1)
        out = jnp.einsum("bhgtk,bkhd->bthgd", p, v)
        return out.reshape(B, T, cfg.num_heads, cfg.head_dim), layer_cache

    dummy_cache = jnp.zeros((cfg.num_layers,))
    hidden, _ = llama.decoder(params, cfg, tokens, positions, dummy_cache, attention)
    return np.asarray(llama.compute_logits(params, cfg, hidden[0]))


def plan_arrays(plan, generated=()):
    """Concatenated tokens, positions and mask of a plan, with `generated`
    tokens appended to its final span (they see everything before them)."""
    tokens = [t for s in plan.spans for t in s.token_ids] + list(generated)
    last = plan.spans[-1].positions[-1]
    positions = [p for s in plan.spans for p in s.positions] + [last + 1 + i for i in range(len(generated))]
    n0 = plan.num_tokens
    mask = np.zeros((len(tokens), len(tokens)), bool)
    mask[:n0, :n0] = plan.dense_mask()
    final_start = n0 - len(plan.spans[-1])
    pos = np.asarray(positions)
    for i in range(n0, len(tokens)):
        visible = np.zeros(len(tokens), bool)
        visible[:final_start] = mask[n0 - 1, :final_start]  # what the final span sees
        visible[final_start:] = True
        mask[i] = visible & (pos <= pos[i])
    return tokens, positions, mask


def plan_logit_weights(plan, reweight, generated=()):
    """[N, N] per-key logit scale and bias over `plan_arrays`' tokens: (scale, bias) =
    `reweight` where a query of a non-plus span (generated tokens belong to the final span)
    attends to a key of a plus child, (1, 0) everywhere else."""
    span_of = np.concatenate(
        [np.full(len(s), s.index) for s in plan.spans] + [np.full(len(generated), len(plan.spans) - 1)]
    )
    is_plus = np.asarray([s.kind == "plus" for s in plan.spans])
    hit = ~is_plus[span_of][:, None] & is_plus[span_of][None, :]
    return np.where(hit, reweight[0], 1.0), np.where(hit, reweight[1], 0.0)
