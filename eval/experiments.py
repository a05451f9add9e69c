"""`spanjax run CONFIG [overrides]`: load a YAML preset by its `task` field,
apply dotted overrides, open a run directory and run the task.

    from spanjax.eval.experiments import load_config, run
    cfg = load_config("configs/locality_nq.yaml", ["eval.num_docs=10"])
    results, run_dir = run(cfg)

Tasks: `locality` (eval/locality.py; nq and kv), `ttft_nested`
(eval/nested_ttft.py) and `ttft_rag` (eval/rag_ttft.py).

`engine.mesh`: every task runs one engine on a (1, M) mesh; `locality` also runs data=D > 1 as
D engine replicas (its batches split across them). The TTFT tasks measure one engine's time to
first token, so they refuse data > 1. A run is one process: on a multi-host runtime
(spanjax/distributed.py) the tasks are refused (each would write the run directory from every
host); split an evaluation across hosts with `eval.shard=i/k` and `spanjax merge` instead.
"""

from __future__ import annotations

import importlib
from pathlib import Path

from spanjax import config as C
from spanjax.runs import RunDir, open_run

# ---------------------------------------------------------------------------- registry

# task -> (module, config class, run function); imported lazily.
TASKS = {
    "locality": ("spanjax.eval.locality", "LocalityConfig", "run"),
    "ttft_nested": ("spanjax.eval.nested_ttft", "NestedConfig", "run"),
    "ttft_rag": ("spanjax.eval.rag_ttft", "RagConfig", "run"),
}


# Tasks that run `engine.mesh` data > 1 as engine replicas (the others measure one engine).
REPLICA_TASKS = frozenset({"locality"})


def _task(name: str):
    if name not in TASKS:
        raise C.ConfigError(f"task: unknown task {name!r}; expected one of {sorted(TASKS)}")
    mod, cls, fn = TASKS[name]
    m = importlib.import_module(mod)
    return getattr(m, cls), getattr(m, fn)


def config_class(data: dict):
    task = data.get("task")
    if task is None:
        raise C.ConfigError(f"missing required key 'task' (one of {sorted(TASKS)})")
    return _task(task)[0]


def load_config(path: str | Path, overrides=()):
    """The preset at `path` with overrides, as its task's frozen config class."""
    data = C.apply_overrides(C.read_yaml(path), overrides)
    cls = config_class(data)
    return C.from_dict(cls, data)


def run(cfg, resume: str | Path | None = None, model=None) -> tuple[dict, RunDir]:
    """Run a loaded config in a new run dir (or resume one); returns (results, run dir)."""
    _, fn = _task(cfg.task)
    check_placement(cfg)
    task = importlib.import_module(TASKS[cfg.task][0])
    scope, settable = getattr(task, "RESUMABLE_SCOPE", ()), getattr(task, "RESUMABLE_WHEN_UNSET", ())
    run_dir = open_run(cfg, resume, scope, settable, getattr(task, "keys_unused_by", None))
    try:
        results = fn(cfg, run_dir, model=model)
    except KeyboardInterrupt:
        run_dir.log.warning(
            "interrupted; finished items are kept. Resume with: spanjax run %s/config.yaml --resume %s",
            run_dir.path,
            run_dir.path,
        )
        raise
    run_dir.log.info("results: %s", run_dir.path / "results.json")
    return results, run_dir


def check_placement(cfg) -> None:
    """Refuse, before a run directory is made, what the task cannot run: `engine.mesh` with
    data > 1 for a task without replicas, a mesh that is not the number of devices, and more
    than one process (ConfigError: one line from the CLI)."""
    import jax

    if jax.process_count() > 1:
        raise C.ConfigError(
            f"task {cfg.task}: experiment runs are one process, this runtime has {jax.process_count()} "
            "(multi-host); run one process per host with eval.shard=i/k and join them with spanjax merge"
        )
    engine = getattr(cfg, "engine", None)
    spec = None if engine is None else engine.mesh_spec
    if spec is None:
        return
    if spec.data > 1 and cfg.task not in REPLICA_TASKS:
        raise C.ConfigError(
            f"task {cfg.task}: engine.mesh={spec} asks for {spec.data} engine replicas, but {cfg.task} measures "
            f"one engine; use data=1 (engine.mesh=model={spec.model}). Replicas: {', '.join(sorted(REPLICA_TASKS))}"
        )
    if spec.num_devices > 1 and spec.num_devices != jax.device_count():
        raise C.ConfigError(
            f"task {cfg.task}: engine.mesh={spec} needs {spec.num_devices} devices, there are {jax.device_count()} "
            "(on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N fakes N devices)"
        )
