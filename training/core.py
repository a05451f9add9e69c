"""The training core every recipe runs on: LoRA / aLoRA (trainer.py), block-attention
adapters (block_adapter.py) and MLP speculators (speculator.py).

A recipe supplies what differs (`Recipe`: the initial trained pytree, a hashable
`Objective` to differentiate, the batch of each step, how a step's metrics are logged);
the core owns the rest:

- `TrainState` (steps completed, the trained pytree, the optimizer state) and
  `update`, one jitted optimizer step: optax AdamW, linear warmup then cosine decay,
  global-norm clipping; the dropout key is fold_in(seed, step);
- `open_run_dir`: `out_dir/name/`, refusing a directory that holds another config;
- `train_loop`: Orbax checkpoints every `checkpoint_every` steps and at the end,
  `metrics.jsonl` (one line per `log_every` steps and per evaluation), a tqdm bar, eval
  callbacks (`Recipe.evals`) and hooks (e.g. `crash_after`, a simulated kill for tests).

Exact resume: a batch is a function of its step, the dropout key too, and the checkpoint
holds the whole state, so a run killed after checkpoint k and resumed replays steps
k+1.. bit for bit (the metric lines a killed run wrote past k are dropped and rewritten).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax

from spanjax import config as C
from spanjax.models import llama
from spanjax.runs import progress
from spanjax.training.checkpoint import Checkpointer

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.yaml"


class SimulatedCrash(RuntimeError):
    """Raised by the `crash_after(k)` hook (`train(..., crash_after_step=k)`) to test resuming after a kill."""


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # int32 scalar: steps completed
    params: Any  # the trained pytree (adapter weights, speculator parameters)
    opt_state: Any


# ---------------------------------------------------------------------------- optimizer and update


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


def init_state(params, optim, steps: int) -> TrainState:
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=make_optimizer(optim, steps).init(params))


class Objective(Protocol):
    """What a recipe differentiates. Hashable (a frozen dataclass of static configs): `update`
    compiles once per objective, so a resumed or repeated run reuses the compilation."""

    def context(self, frozen, batch):
        """Inputs computed outside the gradient (e.g. the base model's prefix KV), or None."""

    def loss(self, params, rng, frozen, batch, context) -> tuple[jax.Array, dict]:
        """(scalar loss, extra metrics) of the trained `params` on `batch`."""


@functools.partial(jax.jit, static_argnames=("objective", "optim", "steps", "seed"), donate_argnums=(0,))
def update(state: TrainState, frozen, batch, *, objective: Objective, optim, steps: int, seed: int):
    """One optimizer step: (new state, metrics: loss, grad_norm, lr, then the objective's own).
    `frozen` (e.g. the base model's parameters) is an input of the loss that never trains."""
    context = objective.context(frozen, batch)
    optimizer, schedule = make_optimizer(optim, steps), make_schedule(optim, steps)
    rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
    loss_fn = lambda params, rng: objective.loss(params, rng, frozen, batch, context)
    (loss, extra), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads), "lr": schedule(state.step), **extra}
    return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics


def masked_nll(params, model_cfg, h, labels, loss_mask):
    """Mean next-token NLL of hidden states `h` [..., H] against `labels` where `loss_mask`, and the token count."""
    logits = llama.compute_logits(params, model_cfg, h)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    n = jnp.sum(loss_mask)
    return jnp.sum(nll * loss_mask) / jnp.maximum(n, 1.0), n


# ---------------------------------------------------------------------------- the run loop


def open_run_dir(cfg) -> Path:
    """`cfg.out_dir/cfg.name`, created with config.yaml; an existing one must hold the same config."""
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / CONFIG_FILE
    if cfg_path.exists():
        old = C.from_dict(type(cfg), C.read_yaml(cfg_path))
        if old != cfg:
            raise C.ConfigError(
                f"{run_dir} holds a run of a different config ({'; '.join(C.diff(old, cfg))}); use another name"
            )
    else:
        cfg_path.write_text(C.dump(cfg))
    return run_dir


def float_metrics(step: int, metrics: dict) -> dict:
    """The default metrics line: every metric as a float."""
    return {k: float(v) for k, v in metrics.items()}


@dataclasses.dataclass
class Recipe:
    """What a training run needs beyond the core."""

    desc: str  # progress-bar label
    params: Any  # the trained pytree of a fresh run
    objective: Objective
    frozen: Any  # passed to the objective, never trained (the base model's parameters)
    batch: Callable[[int], Any]  # the batch of step s (0-based): a function of s alone (exact resume)
    # Untimed work before step s (e.g. loading a stage's data).
    prepare: Callable[[int], None] = lambda step: None
    # (step, metrics of `update`) -> the step's metrics.jsonl fields (host floats).
    log: Callable[[int, dict], dict] = float_metrics
    # The step's fields -> the progress bar's postfix.
    postfix: Callable[[dict], dict] = lambda line: {"loss": f"{line['loss']:.4f}"}
    # Eval callbacks (steps done, state) -> fields; non-empty ones join that step's line, which is always logged.
    evals: Sequence[Callable[[int, TrainState], dict]] = ()


Hook = Callable[[int, TrainState], None]  # (steps done, state) after the step is logged and checkpointed


def crash_after(step: int) -> Hook:
    """A hook that kills the run (SimulatedCrash) once `step` steps are done, logged and checkpointed as due."""

    def hook(done: int, state: TrainState) -> None:
        if done == step:
            raise SimulatedCrash(f"simulated kill after step {done}")

    return hook


@dataclasses.dataclass(frozen=True)
class LoopResult:
    state: TrainState
    resumed_from: int  # steps restored from the last checkpoint (0 = fresh)
    wall_s: float  # this session's loop, checkpoints included
    step_s: float  # this session's steps: batches and updates (not `prepare` or evals)


def train_loop(cfg, run_dir: Path, recipe: Recipe, hooks: Sequence[Hook] = ()) -> LoopResult:
    """Run (or resume) steps 0..cfg.steps-1 of `recipe` in `run_dir` (see the module docstring).
    Reads cfg.steps, cfg.optim, cfg.seed, cfg.checkpoint_every and cfg.log_every."""
    state = init_state(recipe.params, cfg.optim, cfg.steps)
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint_every)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state)
    metrics_path = run_dir / METRICS_FILE
    truncate_metrics(metrics_path, start)
    bar = progress(cfg.steps, start, f"train {recipe.desc}")
    t_run, step_s = time.perf_counter(), 0.0
    try:
        with open(metrics_path, "a") as mf:
            for step in range(start, cfg.steps):
                recipe.prepare(step)
                t0 = time.perf_counter()
                state, metrics = update(
                    state,
                    recipe.frozen,
                    recipe.batch(step),
                    objective=recipe.objective,
                    optim=cfg.optim,
                    steps=cfg.steps,
                    seed=cfg.seed,
                )
                done = step + 1
                line = {"step": done, **recipe.log(step, metrics)}
                dt = time.perf_counter() - t0
                step_s += dt
                evaluated = {}
                for evaluate in recipe.evals:
                    evaluated.update(evaluate(done, state))
                line.update(evaluated)
                if evaluated or done % cfg.log_every == 0 or done == cfg.steps:
                    mf.write(json.dumps({**line, "step_s": dt}) + "\n")
                    mf.flush()
                if done % cfg.checkpoint_every == 0 or done == cfg.steps:
                    ckpt.save(done, state, force=True)
                bar.update(1)
                bar.set_postfix(**recipe.postfix(line))
                for hook in hooks:
                    hook(done, state)
    finally:
        bar.close()
        ckpt.close()
    return LoopResult(state, start, time.perf_counter() - t_run, step_s)


def truncate_metrics(path: Path, upto: int) -> None:
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


def read_metrics(run_dir) -> list[dict]:
    p = Path(run_dir) / METRICS_FILE
    return [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.exists() else []
