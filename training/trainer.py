"""LoRA / aLoRA training: a functional, jitted `train_step(state, batch) -> (state, metrics)`.

The base model is frozen; only the adapter pytree trains (optax AdamW, linear
warmup then cosine decay, global-norm clipping). For an aLoRA the prefix
(everything before the invocation) is run once through the base model into a
dense KV cache, outside the differentiated function: it does not depend on
the adapter, so only the short suffix (invocation + answer) is
back-propagated, the training-side counterpart of reusing the base cache at
inference. A LoRA adapts every token, so its whole prompt is the suffix.

Exact resume: data order (training/data.py) and the dropout key
(fold_in(seed, step)) are functions of the step, and the Orbax checkpoint
holds the full state, so a run killed after checkpoint k and resumed replays
steps k+1.. bit for bit (tests/training checks the loss curve).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from spanjax.adapters import Adapter, AdapterConfig, AdapterWeights, bank_from_weights, export_peft, init_adapter
from spanjax.models import llama
from spanjax.training.checkpoint import Checkpointer
from spanjax.training.config import TrainConfig
from spanjax.training.data import Batch, batch_indices, encode_example, make_batch, read_jsonl

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


class SimulatedCrash(RuntimeError):
    """Raised by `train(..., crash_after_step=k)` to test resuming after a kill."""


@dataclasses.dataclass(frozen=True)
class TrainState:
    step: jax.Array  # int32 scalar: steps completed
    weights: AdapterWeights
    opt_state: object


jax.tree_util.register_dataclass(TrainState, data_fields=["step", "weights", "opt_state"], meta_fields=[])


def make_schedule(optim, steps: int):
    warmup = min(optim.warmup_steps, max(steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=optim.lr,
        warmup_steps=warmup,
        decay_steps=max(steps, warmup + 1),
        end_value=optim.lr * optim.end_lr_fraction,
    )


def make_optimizer(optim, steps: int):
    return optax.chain(
        optax.clip_by_global_norm(optim.clip_norm),
        optax.adamw(make_schedule(optim, steps), b1=optim.b1, b2=optim.b2, weight_decay=optim.weight_decay),
    )


def init_state(adapter_cfg: AdapterConfig, model_cfg, optimizer, key) -> TrainState:
    weights = init_adapter(adapter_cfg, model_cfg, key).weights
    return TrainState(step=jnp.zeros((), jnp.int32), weights=weights, opt_state=optimizer.init(weights))


def masked_nll(params, model_cfg, h, labels, loss_mask):
    """Mean next-token NLL of hidden states `h` [..., H] against `labels` where `loss_mask`, and the token count."""
    logits = llama.compute_logits(params, model_cfg, h)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    n = jnp.sum(loss_mask)
    return jnp.sum(nll * loss_mask) / jnp.maximum(n, 1.0), n


def batch_loss(weights, params, model_cfg, adapter_cfg: AdapterConfig, batch: Batch, cache, rng):
    """Mean next-token NLL over the loss-masked suffix tokens, and the token count."""
    bank = bank_from_weights(weights, adapter_cfg.scale, adapter_cfg.dropout, rng)
    h, _ = llama.forward_dense(params, model_cfg, batch.suffix, batch.suffix_pos, cache, bank, None)
    return masked_nll(params, model_cfg, h, batch.labels, batch.loss_mask)


def apply_update(state: TrainState, loss_fn, *, optim, steps, seed):
    """One optimizer step on `loss_fn(weights, rng) -> (loss, n)` (call inside a jit). The dropout
    key is fold_in(seed, step), so a resumed run replays the same step exactly."""
    optimizer, schedule = make_optimizer(optim, steps), make_schedule(optim, steps)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    (loss, n), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.weights, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.weights)
    weights = optax.apply_updates(state.weights, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), "loss_tokens": n}
    return TrainState(step=state.step + 1, weights=weights, opt_state=opt_state), metrics


@functools.partial(jax.jit, static_argnames=("model_cfg", "adapter_cfg", "optim", "steps", "seed"))
def _train_step(params, state: TrainState, batch: Batch, *, model_cfg, adapter_cfg, optim, steps, seed):
    # Module-level jit keyed by hashable configs: a resumed or repeated run reuses the compilation.
    B, P = batch.prefix.shape
    cache = llama.init_dense_cache(model_cfg, B, P + batch.suffix.shape[1])
    if P:  # base-model prefix (aLoRA): no gradient flows here
        _, cache = llama.forward_dense(params, model_cfg, batch.prefix, batch.prefix_pos, cache)
        cache = jax.lax.stop_gradient(cache)
    loss_fn = lambda weights, rng: batch_loss(weights, params, model_cfg, adapter_cfg, batch, cache, rng)  # noqa: E731
    return apply_update(state, loss_fn, optim=optim, steps=steps, seed=seed)


def make_train_step(params, model_cfg, adapter_cfg: AdapterConfig, optim, steps: int, seed: int):
    """`train_step(state, batch) -> (state, metrics)`, jitted, with the frozen base params bound."""

    def train_step(state: TrainState, batch: Batch):
        return _train_step(
            params, state, batch, model_cfg=model_cfg, adapter_cfg=adapter_cfg, optim=optim, steps=steps, seed=seed
        )

    return train_step, make_optimizer(optim, steps)


# ---------------------------------------------------------------------------- the run loop


def adapter_config(cfg: TrainConfig, invocation_ids) -> AdapterConfig:
    a = cfg.adapter
    return AdapterConfig(
        kind=a.kind,
        r=a.r,
        alpha=a.alpha,
        dropout=a.dropout,
        target_modules=a.target_modules,
        invocation_tokens=tuple(invocation_ids) if a.kind == "alora" else None,
    )


def load_records(cfg: TrainConfig, run_dir: Path) -> list[dict]:
    if cfg.data.source == "answerability":
        from spanjax.training.answerability import build_records, train_indices

        path = run_dir / "train.jsonl"
        if not path.exists():  # written once; a resumed run reads the same file
            recs = build_records(
                train_indices(cfg.data.num_train_questions), cfg.data.num_docs, cfg.data.max_doc_words, cfg.seed
            )
            tmp = path.with_suffix(".tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in recs))
            os.replace(tmp, path)
        return read_jsonl(path)
    return read_jsonl(cfg.data.source)


def prepare_conversations(cfg: TrainConfig, model, run_dir: Path):
    """(adapter config, batch_for_step(step) -> Batch, train_step, optimizer) for conversation data
    (JSONL, or the answerability builder)."""
    tok = model.tokenizer
    inv_ids = list(tok.encode_message(cfg.data.invocation_role, cfg.data.invocation))
    acfg = adapter_config(cfg, inv_ids)
    records = load_records(cfg, run_dir)
    examples = [
        encode_example(tok, r, inv_ids, cfg.data.max_prefix_tokens, cfg.data.max_suffix_tokens) for r in records
    ]
    lora = acfg.kind == "lora"
    P, S = cfg.data.max_prefix_tokens, cfg.data.max_suffix_tokens + (cfg.data.max_prefix_tokens if lora else 0)

    def batch_for_step(step: int) -> Batch:
        idx = batch_indices(len(examples), cfg.batch_size, step, cfg.seed)
        return make_batch([examples[i] for i in idx], P, S, all_adapted=lora)

    train_step, optimizer = make_train_step(model.params, model.cfg, acfg, cfg.optim, cfg.steps, cfg.seed)
    return acfg, batch_for_step, train_step, optimizer


def _truncate_metrics(path: Path, upto: int) -> None:
    """Keep metric lines of steps <= upto (a killed run may have logged past its last checkpoint)."""
    if not path.exists():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= upto:
                keep.append(line)
        except (json.JSONDecodeError, KeyError):
            break  # torn last line
    path.write_text("".join(l + "\n" for l in keep))


def _progress(total, initial, desc):
    from tqdm import tqdm

    return tqdm(
        total=total, initial=initial, desc=desc, dynamic_ncols=True, disable=bool(os.environ.get("SPANJAX_NO_PROGRESS"))
    )


def train(cfg: TrainConfig, model=None, crash_after_step: int | None = None) -> dict:
    """Train (or resume) the run in `cfg.out_dir/cfg.name`; returns a summary dict.

    Outputs: config.yaml, train.jsonl (built data), metrics.jsonl (one line per
    step), checkpoints/ (Orbax, every `checkpoint_every` steps and at the end),
    adapter/ (PEFT format), eval.json when `eval.num_questions` > 0.
    """
    from spanjax import config as C

    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / CONFIG_FILE
    if cfg_path.exists():
        old = C.from_dict(TrainConfig, C.read_yaml(cfg_path))
        if old != cfg:
            raise C.ConfigError(
                f"{run_dir} holds a run of a different config ({'; '.join(C.diff(old, cfg))}); use another name"
            )
    else:
        cfg_path.write_text(C.dump(cfg))
    if model is None:
        from spanjax.models.loading import load_model

        model = load_model(cfg.model)
    if cfg.data.source == "nq_blocks":  # block-attention adapter (training/block_adapter.py)
        from spanjax.training.block_adapter import prepare
    else:
        prepare = prepare_conversations
    acfg, batch_for_step, train_step, optimizer = prepare(cfg, model, run_dir)
    state = init_state(acfg, model.cfg, optimizer, jax.random.PRNGKey(cfg.seed))
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint_every)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state)
    metrics_path = run_dir / METRICS_FILE
    _truncate_metrics(metrics_path, start)
    bar = _progress(cfg.steps, start, f"train {acfg.kind} {cfg.name}")
    t_run = time.perf_counter()
    try:
        with open(metrics_path, "a") as mf:
            for step in range(start, cfg.steps):
                t0 = time.perf_counter()
                state, m = train_step(state, batch_for_step(step))
                m = {k: float(v) for k, v in m.items()}
                done = step + 1
                if done % cfg.log_every == 0 or done == cfg.steps:
                    mf.write(json.dumps({"step": done, **m, "step_s": time.perf_counter() - t0}) + "\n")
                    mf.flush()
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    ckpt.save(done, state, force=True)
                bar.update(1)
                bar.set_postfix(loss=f"{m['loss']:.4f}")
                if crash_after_step is not None and done == crash_after_step:
                    raise SimulatedCrash(f"simulated kill after step {done}")
    finally:
        bar.close()
        ckpt.close()
    adapter = Adapter(acfg, jax.tree_util.tree_map(np.asarray, state.weights))
    export_peft(adapter, str(run_dir / "adapter"), base_model_name_or_path=cfg.model)
    summary = {
        "run_dir": str(run_dir),
        "steps": cfg.steps,
        "resumed_from": start,
        "train_s": time.perf_counter() - t_run,
    }
    if cfg.eval.num_questions:
        from spanjax.training.answerability import evaluate_answerability

        ev = evaluate_answerability(
            model, adapter, cfg, num_questions=cfg.eval.num_questions, batch_size=cfg.eval.batch_size
        )
        (run_dir / "eval.json").write_text(json.dumps(ev, indent=2))
        summary["eval"] = ev
    return summary


def read_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / METRICS_FILE
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
