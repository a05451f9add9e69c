"""Load a llama-family GGUF file: config, parameters, tokenizer metadata.

With `quantized=True`, matrices stored as Q4_0, Q4_1 or Q8_0 stay block-quantized
(`spanjax.kernels.quantized_matmul.BlockQuantized`, the same blocks, only split into arrays):
a CPU decode step then reads 4-bit weights, as llama.cpp does. Otherwise weights are
dequantized to float32 with `gguf.quants.dequantize` (the reference
implementation that ships with llama.cpp's Python package) and then cast to the
requested dtype, so a GGUF model computes with the exact values llama.cpp and
transformers' GGUF loader see. llama.cpp's converter permutes the rows of the
q and k projections (interleaved RoPE pairs); we undo that so the weights are
in Hugging Face's "rotate half" layout, which is the only one kernels/rope.py
implements.
"""

from __future__ import annotations

import dataclasses
import os

import gguf
import jax
import jax.numpy as jnp
import numpy as np

from spanjax.kernels.quantized_matmul import BlockQuantized
from spanjax.models.config import ModelConfig, RopeScaling
from spanjax.models.errors import WeightLoadError
from spanjax.models.llama import LayerParams, Params

# Types this loader dequantizes. Others (IQ*, Q2_K..Q5_K, TQ*, MXFP4) may work
# through gguf.quants but are untested here, so they are refused rather than
# risked silently.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q6_K")
SUPPORTED_ARCHITECTURES = ("llama",)

# GGUF tensor name (per layer) -> LayerParams field.
_LAYER_TENSORS = {
    "attn_norm": "attn_norm",
    "attn_q": "wq",
    "attn_k": "wk",
    "attn_v": "wv",
    "attn_output": "wo",
    "ffn_norm": "mlp_norm",
    "ffn_gate": "w_gate",
    "ffn_up": "w_up",
    "ffn_down": "w_down",
}

# Known Llama-3.x RoPE scalings; a GGUF stores only their effect (the
# `rope_freqs` tensor), so we recognise which one produced it.
_KNOWN_LLAMA3_SCALINGS = (
    RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
    RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=8192),
)


@dataclasses.dataclass(frozen=True)
class GGUFTokenizerData:
    """The tokenizer a GGUF file describes (llama.cpp's `tokenizer.*` keys)."""

    model: str  # tokenizer.ggml.model: "gpt2" = byte-level BPE, "llama" = sentencepiece
    pre: str | None  # tokenizer.ggml.pre: which pre-tokenizer regex the merges were learned with
    tokens: tuple[str, ...]
    token_types: tuple[int, ...]  # llama.cpp token types: 1 normal, 3 control, 4 user-defined, ...
    merges: tuple[str, ...]  # "a b" pairs, best first
    bos_token_id: int | None
    eos_token_id: int | None
    pad_token_id: int | None
    unk_token_id: int | None
    add_bos_token: bool
    chat_template: str | None


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def _require(reader, key, path):
    value = _field(reader, key)
    if value is None:
        raise WeightLoadError(f"{path}: missing metadata key {key!r}")
    return value


def dequantize_tensor(tensor, path: str = "<gguf>") -> np.ndarray:
    """A GGUF tensor as float32 in numpy order ([out, in] for a matrix, as torch stores it)."""
    name = tensor.tensor_type.name
    if name not in SUPPORTED_TYPES:
        raise WeightLoadError(
            f"{path}: tensor {tensor.name!r} has type {name}, which spanjax does not load "
            f"(supported: {', '.join(SUPPORTED_TYPES)})"
        )
    out = gguf.quants.dequantize(np.asarray(tensor.data), tensor.tensor_type)
    # ggml lists dims fastest-first; numpy wants them slowest-first.
    shape = tuple(int(d) for d in reversed(tensor.shape))
    return np.asarray(out, dtype=np.float32).reshape(shape)


# GGUF block layouts this loader can keep quantized: bytes per block of 32 weights.
_KEPT_BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}


def quantized_tensor(tensor) -> BlockQuantized | None:
    """A Q4_0 / Q4_1 / Q8_0 matrix as BlockQuantized numpy arrays [out, in / 32, ...]; None for
    other types. Q4_0 (w = d * (q - 8)) becomes q4 with offset -8 d (exact in fp16)."""
    name = tensor.tensor_type.name
    if name not in _KEPT_BLOCK_BYTES or len(tensor.shape) != 2:
        return None
    out_features = int(tensor.shape[1])
    blocks = np.asarray(tensor.data).reshape(out_features, -1, _KEPT_BLOCK_BYTES[name])
    scale = blocks[..., 0:2].copy().view(np.float16)[..., 0]
    if name == "Q8_0":
        return BlockQuantized(blocks[..., 2:].copy().view(np.int8), scale, None, "q8")
    if name == "Q4_1":
        return BlockQuantized(blocks[..., 4:].copy(), scale, blocks[..., 2:4].copy().view(np.float16)[..., 0], "q4")
    return BlockQuantized(blocks[..., 2:].copy(), scale, (scale.astype(np.float32) * -8).astype(np.float16), "q4")


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo convert_hf_to_gguf's `permute` of q/k rows ([out, in] layout).

    llama.cpp rotates interleaved pairs (x0, x1), (x2, x3)...; the converter
    reorders each head's rows from HF's halves layout into pairs. Inverting it
    restores HF's layout: view rows as [head, pair, 2] and swap back to [head, 2, pair].
    """
    out_dim = w.shape[0]
    return w.reshape(n_head, out_dim // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """The converter's permutation (HF -> GGUF); the inverse of `unpermute_qk`. For tests and writers."""
    out_dim = w.shape[0]
    return w.reshape(n_head, 2, out_dim // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_tokenizer_data(reader, path: str = "<gguf>") -> GGUFTokenizerData:
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise WeightLoadError(f"{path}: no tokenizer in the file (tokenizer.ggml.tokens missing)")

    def opt_int(key):
        value = _field(reader, key)
        return None if value is None else int(value)

    token_types = _field(reader, "tokenizer.ggml.token_type") or [1] * len(tokens)
    return GGUFTokenizerData(
        model=str(_field(reader, "tokenizer.ggml.model", "gpt2")),
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=tuple(tokens),
        token_types=tuple(int(t) for t in token_types),
        merges=tuple(_field(reader, "tokenizer.ggml.merges") or ()),
        bos_token_id=opt_int("tokenizer.ggml.bos_token_id"),
        eos_token_id=opt_int("tokenizer.ggml.eos_token_id"),
        pad_token_id=opt_int("tokenizer.ggml.padding_token_id"),
        unk_token_id=opt_int("tokenizer.ggml.unknown_token_id"),
        add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)),
        chat_template=_field(reader, "tokenizer.chat_template"),
    )


def _rope_scaling(reader, arch, path, tensors) -> RopeScaling | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind not in (None, "none"):
        # Linear/YaRN scaling would need support in ModelConfig.rope_inv_freq.
        raise WeightLoadError(f"{path}: rope scaling type {kind!r} is not supported (only Llama-3 style)")
    freqs = tensors.get("rope_freqs.weight")
    if freqs is None:
        return None
    # llama.cpp divides each inverse frequency by this per-frequency factor.
    factors = dequantize_tensor(freqs, path).reshape(-1)
    theta = float(_field(reader, f"{arch}.rope.freq_base", 10000.0))
    head_dim = 2 * factors.shape[0]
    base = ModelConfig(1, 1, 1, 1, 1, 1, head_dim, rope_theta=theta).rope_inv_freq()
    for cand in _KNOWN_LLAMA3_SCALINGS:
        scaled = ModelConfig(1, 1, 1, 1, 1, 1, head_dim, rope_theta=theta, rope_scaling=cand).rope_inv_freq()
        if np.allclose(base / scaled, factors, rtol=1e-3):
            return cand
    raise WeightLoadError(f"{path}: rope_freqs.weight matches no known Llama-3 rope scaling")


def _open(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise WeightLoadError(f"{path}: no such GGUF file")
    try:
        return gguf.GGUFReader(path)
    except Exception as e:  # the gguf package raises assorted errors on a bad file
        raise WeightLoadError(f"{path}: not a readable GGUF file ({e})") from e


def read_gguf_tokenizer(path: str | os.PathLike) -> GGUFTokenizerData:
    """The tokenizer metadata alone (the tensors are memory-mapped, never read)."""
    path = os.fspath(path)
    return read_tokenizer_data(_open(path), path)


def load_gguf(
    path: str | os.PathLike, dtype=jnp.float32, quantized: bool = False
) -> tuple[ModelConfig, Params, GGUFTokenizerData]:
    """Read a llama-architecture GGUF file into (config, params, tokenizer data).

    quantized: keep Q4_0 / Q4_1 / Q8_0 matrices (layers, embedding, LM head) block-quantized
    where every layer stores that field in a kept type; the rest is dequantized to `dtype`."""
    path = os.fspath(path)
    reader = _open(path)

    arch = _field(reader, "general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise WeightLoadError(
            f"{path}: architecture {arch!r} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    tensors = {t.name: t for t in reader.tensors}
    tok = read_tokenizer_data(reader, path)

    hidden = int(_require(reader, f"{arch}.embedding_length", path))
    n_head = int(_require(reader, f"{arch}.attention.head_count", path))
    n_kv = int(_field(reader, f"{arch}.attention.head_count_kv", n_head))
    head_dim = int(_field(reader, f"{arch}.attention.key_length", hidden // n_head))
    num_layers = int(_require(reader, f"{arch}.block_count", path))
    vocab = int(_field(reader, f"{arch}.vocab_size", len(tok.tokens)))
    tied = "output.weight" not in tensors

    def get(name):
        t = tensors.get(name)
        if t is None:
            raise WeightLoadError(f"{path}: missing tensor {name!r}")
        return dequantize_tensor(t, path)

    def layer_tensor(i, gname):
        t = tensors.get(f"blk.{i}.{gname}.weight")
        if t is None:
            raise WeightLoadError(f"{path}: missing tensor 'blk.{i}.{gname}.weight'")
        return t

    def keep(gname) -> bool:  # every layer's tensor of this field in one kept type
        kinds = {layer_tensor(i, gname).tensor_type.name for i in range(num_layers)}
        return quantized and len(kinds) == 1 and kinds <= set(_KEPT_BLOCK_BYTES)

    per_layer: dict[str, list] = {field: [] for field in _LAYER_TENSORS.values()}
    kept = {gname for gname in _LAYER_TENSORS if keep(gname)}
    for i in range(num_layers):
        for gname, field in _LAYER_TENSORS.items():
            if gname in kept:
                w = quantized_tensor(layer_tensor(i, gname))  # [out, in] blocks; rows permuted as below
                if gname in ("attn_q", "attn_k"):
                    heads = n_head if gname == "attn_q" else n_kv
                    w = jax.tree.map(lambda a, heads=heads: unpermute_qk(a, heads), w)
                per_layer[field].append(w)
                continue
            w = get(f"blk.{i}.{gname}.weight")
            if gname == "attn_q":
                w = unpermute_qk(w, n_head)
            elif gname == "attn_k":
                w = unpermute_qk(w, n_kv)
            # Matrices arrive [out, in]; spanjax computes x @ w with w [in, out].
            per_layer[field].append(w.T if w.ndim == 2 else w)

    def to_jax(a):
        if isinstance(a, BlockQuantized):
            return jax.tree.map(jnp.asarray, a)
        return jnp.asarray(a, dtype=dtype)

    def matrix(name):  # embedding / LM head: [out, in] blocks when kept, else dense [out, in]
        t = tensors.get(name)
        kept = quantized_tensor(t) if quantized and t is not None else None
        return kept if kept is not None else get(name)

    def stack(ws):
        return jax.tree.map(lambda *a: np.stack(a), *ws) if isinstance(ws[0], BlockQuantized) else np.stack(ws)

    embed = matrix("token_embd.weight")
    eos_ids = tuple(i for i in (tok.eos_token_id,) if i is not None)
    cfg = ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=int(_require(reader, f"{arch}.feed_forward_length", path)),
        num_layers=num_layers,
        num_heads=n_head,
        num_kv_heads=n_kv,
        head_dim=head_dim,
        rms_norm_eps=float(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        rope_theta=float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        rope_scaling=_rope_scaling(reader, arch, path, tensors),
        max_position_embeddings=int(_field(reader, f"{arch}.context_length", 2048)),
        tie_word_embeddings=tied,
        architecture=arch,
        bos_token_id=tok.bos_token_id,
        eos_token_ids=eos_ids,
    )
    embed_shape = (embed.out_features, embed.in_features) if isinstance(embed, BlockQuantized) else embed.shape
    if embed_shape != (vocab, hidden):
        raise WeightLoadError(f"{path}: token_embd.weight has shape {embed_shape}, expected {(vocab, hidden)}")
    lm_head = None if tied else matrix("output.weight")
    layers = LayerParams(**{field: to_jax(stack(ws)) for field, ws in per_layer.items()})
    params = Params(
        embed=to_jax(embed),
        layers=layers,
        final_norm=to_jax(get("output_norm.weight")),
        lm_head=None if tied else to_jax(lm_head if isinstance(lm_head, BlockQuantized) else lm_head.T),
    )
    return cfg, params, tok
