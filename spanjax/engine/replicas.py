"""Engine data parallelism: one engine per `data` slice of the mesh.

    replicas = EngineReplicas(model, EngineConfig(mesh="data=2,model=4"))   # 8 devices
    results = replicas.map(lambda engine, query: run_query(engine, query), queries)

A (D, M) mesh gives D engines, each on its own (1, M) sub-mesh (a row of the mesh's devices)
with its own copy of the weights (sharded over its M devices), its own KV pool and its own
scheduler: replicas share nothing, so each is exactly a single engine on fewer devices.
`map` splits a list of items over them round-robin (item i goes to replica i % D, or with
`groups` every item of a group to one replica: a fixed split, so a rerun sends every item to
the same replica and meets the same cache), runs each replica's share in order on a thread of
its own (a jitted step releases the GIL while it computes) and returns the results in the
items' order.

Replicas are one process's: on a multi-host runtime (spanjax/distributed.py) every process
would have to drive every replica, including those on other hosts' devices, so data > 1 is
refused there; one Engine (data=1) spans the hosts' devices instead.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Sequence
from typing import TypeVar

import jax

from spanjax.engine.engine import Engine, EngineConfig
from spanjax.models.loading import LoadedModel
from spanjax.models.sharding import MeshSpec, make_mesh, replica_meshes

T = TypeVar("T")
R = TypeVar("R")


def split_round_robin(items: Sequence[T], n: int) -> list[list[T]]:
    """Items i, i + n, i + 2n, ... for each of the n parts."""
    return [list(items[i::n]) for i in range(n)]


def merge_round_robin(parts: Sequence[Sequence[R]]) -> list[R]:
    """The inverse of `split_round_robin`: part i's j-th result is item j * n + i."""
    n = len(parts)
    out: list = [None] * sum(len(p) for p in parts)
    for i, part in enumerate(parts):
        out[i::n] = part
    return out


class EngineReplicas:
    """`data` engines built from one LoadedModel, one per (1, model) slice of the config's mesh.

    `devices`: the devices of the mesh (default all of `jax.devices()`; their number must be
    data * model). A config without a mesh gives one engine on the default device."""

    def __init__(self, model: LoadedModel, config: EngineConfig = EngineConfig(), devices=None):
        spec = config.mesh_spec or MeshSpec()
        if spec.data > 1 and jax.process_count() > 1:
            raise ValueError(
                f"engine mesh {spec}: engine replicas (data > 1) run in one process, and this runtime has "
                f"{jax.process_count()}; use data=1 (one engine over every host's devices)"
            )
        if spec.num_devices == 1 and devices is None:
            self.mesh = None
            self.engines = [Engine(model, config)]
        else:
            self.mesh = make_mesh(spec, devices)
            self.engines = [Engine(model, config, mesh=sub) for sub in replica_meshes(self.mesh)]

    def __len__(self) -> int:
        return len(self.engines)

    def __getitem__(self, i: int) -> Engine:
        return self.engines[i]

    def map(
        self, fn: Callable[[Engine, T], R], items: Sequence[T], groups: Sequence[Hashable] | None = None
    ) -> list[R]:
        """[fn(engine, item) for item in items], in the items' order.

        Item i runs on replica i % D; with `groups` (one key per item), every item of a group
        runs on one replica, the groups dealt round-robin in the order they first appear (a
        question's batches on one replica, which keeps their cached pages). Each replica runs
        its items one after another, in the items' order, on its own thread. After an exception
        (or a KeyboardInterrupt here) the replicas start no further item, the ones running
        finish theirs, and the first exception is re-raised."""
        items = list(items)
        assignment = self.assign(len(items), groups)
        if len(self.engines) == 1:
            return [fn(self.engines[0], item) for item in items]
        results: list = [None] * len(items)
        errors: list[BaseException] = []
        stop = threading.Event()

        def work(r: int) -> None:
            try:
                for i in assignment[r]:
                    if stop.is_set():
                        return
                    results[i] = fn(self.engines[r], items[i])
            except BaseException as e:  # re-raised on the caller's thread
                errors.append(e)
                stop.set()

        threads = [
            threading.Thread(target=work, args=(r,), name=f"engine-replica-{r}") for r in range(len(self.engines))
        ]
        for t in threads:
            t.start()
        try:
            for t in threads:
                t.join()
        except BaseException:  # Ctrl-C while waiting: let the running items finish, start no more
            stop.set()
            for t in threads:
                t.join()
            raise
        if errors:
            raise errors[0]
        return results

    def assign(self, n: int, groups: Sequence[Hashable] | None = None) -> list[list[int]]:
        """The item indices each replica runs (see `map`), in order."""
        if groups is not None and len(groups) != n:
            raise ValueError(f"{len(groups)} groups for {n} items")
        order: dict = {}  # group -> its index in order of first appearance
        parts: list[list[int]] = [[] for _ in self.engines]
        for i in range(n):
            g = i if groups is None else order.setdefault(groups[i], len(order))
            parts[g % len(self.engines)].append(i)
        return parts

    def stats(self) -> list[dict]:
        return [engine.stats() for engine in self.engines]
