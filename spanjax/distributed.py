"""Multi-host JAX: every host runs the same program, and `initialize()` joins them into one
runtime whose `jax.devices()` are the devices of all hosts (docs/scaling.md, "Multi-host").

    from spanjax import distributed
    distributed.initialize()          # before anything touches a device; a no-op on one host
    mesh = make_mesh(parse_mesh("data=2,model=4"))   # over the global jax.devices()

Where the settings come from (the first of each that is set):

    coordinator    SPANJAX_COORDINATOR,   JAX_COORDINATOR_ADDRESS   host:port of process 0
    processes      SPANJAX_NUM_PROCESSES, JAX_NUM_PROCESSES
    process id     SPANJAX_PROCESS_ID,    JAX_PROCESS_ID            0 .. processes - 1

None of them set: nothing happens (one process, today's behaviour). A coordinator without
the count or id leaves those to JAX's cluster detection (SLURM, Open MPI, Kubernetes, Cloud
TPU); `SPANJAX_DISTRIBUTED=auto` asks JAX to detect everything. On CPU the hosts' collectives
go over gloo (TCP), which `initialize` turns on (`jax_cpu_collectives_implementation`).

This module imports only jax, so it sits at the bottom of the layer order (tests/test_layers.py).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping

import jax

# (spanjax name, JAX name) of each setting; the spanjax one wins when both are set.
ENV = {
    "coordinator": ("SPANJAX_COORDINATOR", "JAX_COORDINATOR_ADDRESS"),
    "num_processes": ("SPANJAX_NUM_PROCESSES", "JAX_NUM_PROCESSES"),
    "process_id": ("SPANJAX_PROCESS_ID", "JAX_PROCESS_ID"),
}
AUTO_ENV = "SPANJAX_DISTRIBUTED"  # "auto": let jax.distributed.initialize detect the cluster


@dataclasses.dataclass(frozen=True)
class Settings:
    coordinator: str | None = None  # None (with `auto`): detected by JAX
    num_processes: int | None = None
    process_id: int | None = None
    auto: bool = False


def _int(env: Mapping[str, str], names: tuple[str, ...]) -> int | None:
    for name in names:
        if env.get(name, "").strip():
            try:
                return int(env[name])
            except ValueError:
                raise ValueError(f"{name}={env[name]!r}: expected an integer") from None
    return None


def settings_from_env(env: Mapping[str, str] | None = None) -> Settings | None:
    """The multi-host settings the environment gives, or None (single process)."""
    env = os.environ if env is None else env
    coordinator = next((env[n].strip() for n in ENV["coordinator"] if env.get(n, "").strip()), None)
    num_processes = _int(env, ENV["num_processes"])
    process_id = _int(env, ENV["process_id"])
    auto = env.get(AUTO_ENV, "").strip().lower()
    if auto not in ("", "auto", "0", "off"):
        raise ValueError(f"{AUTO_ENV}={env[AUTO_ENV]!r}: expected 'auto' (or unset)")
    if coordinator is None and num_processes is None and process_id is None:
        return Settings(auto=True) if auto == "auto" else None
    if coordinator is None and auto != "auto":
        raise ValueError(
            f"multi-host settings need the coordinator's host:port ({' or '.join(ENV['coordinator'])}); "
            f"got {num_processes=}, {process_id=}"
        )
    if num_processes is not None and num_processes < 1:
        raise ValueError(f"the number of processes must be >= 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise ValueError(f"process id {process_id} is not in 0..{num_processes - 1}")
    return Settings(coordinator, num_processes, process_id, auto == "auto")


def gloo_available() -> bool:
    """Whether this jaxlib has gloo CPU collectives (what multi-process CPU runs need)."""
    try:
        from jax._src.lib import _jax
    except ImportError:  # pragma: no cover - layout of other jaxlib versions
        return False
    return hasattr(_jax, "make_gloo_tcp_collectives")


def enable_cpu_collectives() -> None:
    """Cross-process collectives on CPU over gloo (TCP). Must run before the CPU backend starts."""
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


_initialized: Settings | None = None


def initialize(settings: Settings | None = None, *, timeout_s: int = 300) -> bool:
    """Join the multi-host runtime the environment describes (`settings_from_env`, or the
    given `settings`); False, doing nothing, when there is none. Call it first, before any
    JAX computation, on every host; a second call is a no-op (True)."""
    global _initialized
    if _initialized is not None:
        return True
    settings = settings_from_env() if settings is None else settings
    if settings is None:
        return False
    if not gloo_available():
        raise RuntimeError("this jaxlib has no gloo CPU collectives: multi-process runs on CPU are not possible")
    enable_cpu_collectives()
    jax.distributed.initialize(
        coordinator_address=settings.coordinator,
        num_processes=settings.num_processes,
        process_id=settings.process_id,
        initialization_timeout=timeout_s,
    )
    _initialized = settings
    return True


def is_main_process() -> bool:
    """Process 0: the one that writes a run's shared files (metrics, exports)."""
    return jax.process_index() == 0
