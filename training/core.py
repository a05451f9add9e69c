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
- On a mesh (the config's `mesh` setting, e.g. "data=2,model=4"; training/mesh.py): the
  frozen inputs sharded by the recipe's `frozen_specs` (the base model: the "training" rules,
  FSDP over `data`, heads and MLP over `model`), the batch over `data`, the trained pytree
  and optimizer state by `param_specs`, and `update` jitted with those as explicit in/out
  shardings: the same step as on one device. Checkpoints are saved sharded and restore onto
  whatever mesh the resumed run has. One device (the default) is the unsharded path.
  Multi-host (spanjax/distributed.py): every process runs the loop; process 0 alone writes
  config.yaml and metrics.jsonl.

Exact resume: a batch is a function of its step, the dropout key too, and the checkpoint
holds the whole state, so a run killed after checkpoint k and resumed replays steps
k+1.. bit for bit (the metric lines a killed run wrote past k are dropped and rewritten).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spanjax import config as C
from spanjax.distributed import is_main_process
from spanjax.models import llama
from spanjax.runs import progress
from spanjax.training import mesh as M
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


UPDATE_STATIC = ("objective", "optim", "steps", "seed")


def _update(state: TrainState, frozen, batch, *, objective: Objective, optim, steps: int, seed: int):
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


update = jax.jit(_update, static_argnames=UPDATE_STATIC, donate_argnums=(0,))


_sharded_updates: dict = {}  # one jitted function per placement, so a repeated or resumed run reuses its compilation


def sharded_update(mesh: Mesh, state_shardings, frozen_shardings):
    """`update` with explicit in/out shardings on `mesh`: the state as `state_shardings` (kept
    step to step), frozen inputs as `frozen_shardings`, the batch over `data`, metrics
    replicated (training/mesh.py). Called like `update`."""
    key = (mesh, *((jax.tree.structure(t), tuple(jax.tree.leaves(t))) for t in (state_shardings, frozen_shardings)))
    if key not in _sharded_updates:
        _sharded_updates[key] = jax.jit(
            lambda state, frozen, batch, *static: _update(state, frozen, batch, **dict(zip(UPDATE_STATIC, static))),
            static_argnums=tuple(range(3, 3 + len(UPDATE_STATIC))),  # no keyword arguments with in_shardings
            donate_argnums=(0,),
            in_shardings=(state_shardings, frozen_shardings, M.batch_sharding(mesh)),
            out_shardings=(state_shardings, NamedSharding(mesh, PartitionSpec())),
        )
    jitted = _sharded_updates[key]
    return lambda state, frozen, batch, **static: jitted(state, frozen, batch, *(static[k] for k in UPDATE_STATIC))


def masked_nll(params, model_cfg, h, labels, loss_mask):
    """Mean next-token NLL of hidden states `h` [..., H] against `labels` where `loss_mask`, and the token count."""
    logits = llama.compute_logits(params, model_cfg, h)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[..., None], axis=-1)[..., 0]
    n = jnp.sum(loss_mask)
    return jnp.sum(nll * loss_mask) / jnp.maximum(n, 1.0), n


# ---------------------------------------------------------------------------- the run loop


# Config fields that say where a run computes, not what: a run may resume with another value
# (a checkpoint saved on one mesh restores onto another).
PLACEMENT_FIELDS = ("mesh",)


def open_run_dir(cfg) -> Path:
    """`cfg.out_dir/cfg.name`, created with config.yaml (by process 0 of a multi-host run); an
    existing one must hold the same config, up to `PLACEMENT_FIELDS`."""
    run_dir = Path(cfg.out_dir) / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    cfg_path = run_dir / CONFIG_FILE
    if cfg_path.exists():
        old = C.from_dict(type(cfg), C.read_yaml(cfg_path))
        same = {f: getattr(cfg, f) for f in PLACEMENT_FIELDS if hasattr(cfg, f)}
        if dataclasses.replace(old, **same) != cfg:
            raise C.ConfigError(
                f"{run_dir} holds a run of a different config ({'; '.join(C.diff(old, cfg))}); use another name"
            )
    elif is_main_process():
        tmp = cfg_path.with_suffix(".tmp")
        tmp.write_text(C.dump(cfg))
        os.replace(tmp, cfg_path)
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
    # On a mesh (training/mesh.py): mesh -> PartitionSpec pytree of `params` / `frozen`; None = replicated.
    param_specs: Callable[[Mesh], Any] | None = None
    frozen_specs: Callable[[Mesh], Any] | None = None


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


@dataclasses.dataclass(frozen=True)
class Placement:
    """How a run's arrays sit on its devices: the initial state, the frozen inputs, the step
    function and how a host batch becomes its input (identity on one device)."""

    state: TrainState
    frozen: Any
    update: Callable
    batch: Callable[[Any], Any]


def place_run(recipe: Recipe, optim, steps: int, mesh: Mesh | None) -> Placement:
    """The fresh state and frozen inputs of `recipe` on `mesh` (None: one device, unsharded)."""
    if mesh is None:
        return Placement(init_state(recipe.params, optim, steps), recipe.frozen, update, lambda batch: batch)
    init = functools.partial(init_state, optim=optim, steps=steps)
    param_specs = None if recipe.param_specs is None else recipe.param_specs(mesh)
    state_sh = M.state_shardings(jax.eval_shape(init, recipe.params), param_specs, make_optimizer(optim, steps), mesh)
    frozen_sh = M.named(mesh, None if recipe.frozen_specs is None else recipe.frozen_specs(mesh))
    state = jax.jit(init, out_shardings=state_sh)(M.place(recipe.params, state_sh.params))
    return Placement(
        state,
        M.place(recipe.frozen, frozen_sh),
        sharded_update(mesh, state_sh, frozen_sh),
        lambda batch: M.place_batch(batch, mesh),
    )


def train_loop(cfg, run_dir: Path, recipe: Recipe, hooks: Sequence[Hook] = ()) -> LoopResult:
    """Run (or resume) steps 0..cfg.steps-1 of `recipe` in `run_dir` (see the module docstring).
    Reads cfg.steps, cfg.optim, cfg.seed, cfg.checkpoint_every, cfg.log_every and cfg.mesh
    (absent: one device)."""
    run = place_run(recipe, cfg.optim, cfg.steps, M.mesh_from_setting(getattr(cfg, "mesh", None)))
    state = run.state
    ckpt = Checkpointer(run_dir / "checkpoints", cfg.checkpoint_every)
    start = ckpt.latest_step() or 0
    if start:
        state = ckpt.restore(start, state)  # onto this run's shardings, whatever mesh saved it
    main = is_main_process()
    metrics_path = run_dir / METRICS_FILE
    if main:
        truncate_metrics(metrics_path, start)
    bar = progress(cfg.steps, start, f"train {recipe.desc}")
    t_run, step_s = time.perf_counter(), 0.0
    try:
        with open(metrics_path, "a") if main else open(os.devnull, "w") as mf:
            for step in range(start, cfg.steps):
                recipe.prepare(step)
                t0 = time.perf_counter()
                state, metrics = run.update(
                    state,
                    run.frozen,
                    run.batch(recipe.batch(step)),
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
