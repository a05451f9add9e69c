"""Block-attention adapter training (training/block_adapter.py) on a tiny random model:
the masked training forward equals the brute-force dense reference and the engine on
random span plans (base, LoRA, aLoRA); aLoRA document tokens are bitwise the base
model's; the data are the locality eval's queries lowered by the span planner (DEV
questions only: test_block_training.py)."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from dense_reference import masked_dense_logits, plan_arrays
from tiny_byte import CFG, tiny_model

from spanjax.adapters import AdapterConfig, adapter_mask, bank_from_weights, init_adapter, make_bank
from spanjax.engine.adapters import lower_for_engine
from spanjax.engine.engine import Engine, EngineConfig
from spanjax.engine.sampling import SamplingParams
from spanjax.models import llama
from spanjax.query import ast as A
from spanjax.query.fake import SPECIAL
from spanjax.query.lower import lower
from spanjax.training import block_adapter as BA

PAGE = 4


@pytest.fixture(scope="module")
def setup():
    model = tiny_model()
    tok = model.tokenizer
    inv = BA.opening_ids(tok, "user", "Question:")
    adapters = {
        "lora": init_adapter(
            AdapterConfig(kind="lora", r=2, alpha=4, target_modules=("q", "v", "up")),
            CFG,
            jax.random.key(2),
            b_scale=0.5,
        ),
        "alora": init_adapter(
            AdapterConfig(
                kind="alora", r=4, alpha=8, target_modules=("q", "k", "v", "o", "down"), invocation_tokens=inv
            ),
            CFG,
            jax.random.key(1),
            b_scale=0.5,
        ),
    }
    eng = Engine(
        model,
        EngineConfig(num_pages=512, page_size=PAGE, max_tokens_per_step=64, max_seqs_per_step=8, attention="reference"),
    )
    for name, ad in adapters.items():
        eng.register_adapter(name, ad)
    return model, tok, adapters, eng


def random_g(rng, adapter=None) -> A.G:
    """A RAG-shaped query with random documents, policies and (sometimes) text after the plus."""
    words = ["alpha ", "beta ", "gamma ", "delta "]
    docs = tuple(
        A.user(f"Document [{k}]" + "".join(rng.choice(words, int(rng.integers(1, 6)))))
        for k in range(int(rng.integers(1, 5)))
    )
    msgs = [A.system("use the documents"), A.Plus(docs)]
    if rng.random() < 0.5:
        msgs.append(A.user("note: " + str(rng.choice(words))))
    msgs.append(A.user(f"Question: what is {rng.choice(words)}?\nAnswer:"))
    return A.G(
        "tiny",
        A.Cross(tuple(msgs)),
        max_tokens=3,
        adapter=adapter,
        attention=str(rng.choice(["prefix", "isolated"])),
        positions=str(rng.choice(["sequential", "parallel"])),
    )


T_PAD = 256  # one compiled shape for every sequence (padding rows see only themselves)


@functools.partial(jax.jit, static_argnames=("collect_kv",))
def _forward(params, tokens, positions, mask, bank, amask, collect_kv=False):
    return BA.forward_masked(
        params, CFG, tokens, positions, mask, adapter=bank, adapter_mask=amask, collect_kv=collect_kv
    )


def forward(model, low: BA.Lowered, bank=None, amask=None, collect_kv=False):
    """forward_masked on one sequence padded to T_PAD; (hidden [n, H], kv [L, n, ...] or None)."""
    n = len(low.tokens)
    assert n <= T_PAD
    tokens, positions, mask = np.zeros(T_PAD, np.int32), np.zeros(T_PAD, np.int32), np.eye(T_PAD, dtype=bool)
    tokens[:n], positions[:n], mask[:n, :n] = low.tokens, low.positions, low.mask
    am = np.zeros(T_PAD, bool)
    if amask is not None:
        am[:n] = amask
    h, kv = _forward(
        model.params, tokens[None], positions[None], mask[None], bank, None if bank is None else am[None], collect_kv
    )
    return h[0, :n], (None if kv is None else tuple(x[:, 0, :n] for x in kv))


def masked_logits(model, low: BA.Lowered, bank=None, amask=None):
    return np.asarray(llama.compute_logits(model.params, model.cfg, forward(model, low, bank, amask)[0]))


@pytest.mark.parametrize("adapter", [None, "lora", "alora"])
def test_masked_forward_equals_dense_reference_and_engine(setup, adapter):
    model, tok, adapters, eng = setup
    rng = np.random.default_rng({None: 0, "lora": 1, "alora": 2}[adapter])
    bank = make_bank([adapters[adapter]], CFG) if adapter else None
    for _ in range(2):
        g = random_g(rng, adapter)
        plan = lower(dataclasses.replace(g, adapter=None), tok, model="tiny", page_size=PAGE)  # what training lowers
        eng.clear_cache()  # no (approximate) sequential-offset reuse across the random plans
        req = eng.submit(
            lower_for_engine(g, tok, model="tiny", page_size=PAGE, adapters=eng.adapters),
            SamplingParams(max_tokens=3, ignore_eos=True),
            keep_logits=True,
        )
        eng.run_until_done([req])
        gen = req.generated[:-1]
        low = BA.lower_plan(plan, gen)
        # The training sequence is the reference's: same tokens, positions and mask.
        tokens, positions, mask = plan_arrays(plan, gen)
        np.testing.assert_array_equal(low.tokens, tokens)
        np.testing.assert_array_equal(low.positions, positions)
        np.testing.assert_array_equal(low.mask, mask)
        amask = adapter_mask(adapters[adapter].config, low.tokens) if adapter else None
        got = masked_logits(model, low, bank, amask)
        if adapter is None:
            np.testing.assert_allclose(
                got, masked_dense_logits(model.params, CFG, tokens, positions, mask), atol=1e-5, rtol=1e-5
            )
        n0 = plan.num_tokens
        np.testing.assert_allclose(got[n0 - 1 :], np.stack(req.logits), atol=2e-4, rtol=1e-4)


def test_alora_document_tokens_are_the_base_models_and_split_loss_equals_one_pass(setup):
    model, tok, adapters, _ = setup
    rng = np.random.default_rng(5)
    items = [
        BA.lower_plan(
            lower(random_g(rng), tok, model="tiny", page_size=PAGE), tok.encode("an answer") + [SPECIAL["end"]]
        )
        for _ in range(3)
    ]
    inv = adapters["alora"].config.invocation_tokens
    for kind in ("alora", "lora"):
        ad = adapters[kind]
        bank = bank_from_weights(ad.weights, ad.config.scale)
        for low in items:
            k = BA.invocation_start(low.tokens, inv)
            amask = adapter_mask(ad.config, low.tokens)
            h_base, kv_base = forward(model, low, collect_kv=True)
            h_ad, kv_ad = forward(model, low, bank, amask, collect_kv=True)
            if kind == "alora":  # system + documents: bitwise the base model's hidden states and KV
                np.testing.assert_array_equal(np.asarray(h_ad[:k]), np.asarray(h_base[:k]))
                for a, b in zip(kv_ad, kv_base):
                    np.testing.assert_array_equal(np.asarray(a[:, :k]), np.asarray(b[:, :k]))
            assert not np.allclose(np.asarray(h_ad[k:]), np.asarray(h_base[k:]), atol=1e-4)  # the adapter acts
        # The training step's split (aLoRA: base prefix KV without gradients) gives the one-pass loss.
        P, S = (192, 64) if kind == "alora" else (0, 256)
        batch = BA.make_block_batch(items, P, S, 16, inv if kind == "alora" else None)
        loss, n = BA.block_loss(
            ad.weights, None, model.params, CFG, ad.config, batch, BA.base_context(model.params, CFG, batch)
        )
        ref = []
        for low in items:
            amask = adapter_mask(ad.config, low.tokens)
            lg = masked_logits(model, low, bank, amask)
            logp = jax.nn.log_softmax(jnp.asarray(lg[low.answer_start - 1 : -1]), axis=-1)
            ref.extend(-np.asarray(logp)[np.arange(len(logp)), low.tokens[low.answer_start :]])
        assert int(n) == len(ref)
        np.testing.assert_allclose(float(loss), np.mean(ref), rtol=1e-5)
