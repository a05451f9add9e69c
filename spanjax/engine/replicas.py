"""Engine data parallelism: one engine per `data` slice of the mesh.

    replicas = EngineReplicas(model, EngineConfig(mesh="data=2,model=4"))   # 8 devices
    results = replicas.map(lambda engine, query: run_query(engine, query), queries)

A (D, M) mesh gives D engines, each on its own (1, M) sub-mesh (a row of the mesh's devices)
with its own copy of the weights (sharded over its M devices), its own KV pool and its own
scheduler: replicas share nothing, so each is exactly a single engine on fewer devices.
`map` splits a list of items over them round-robin (item i goes to replica i % D: a fixed
split, so a rerun sends every item to the same replica and meets the same cache), runs each
replica's share in order on a thread of its own (a jitted step releases the GIL while it
computes) and returns the results in the items' order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import TypeVar

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

    def map(self, fn: Callable[[Engine, T], R], items: Sequence[T]) -> list[R]:
        """[fn(engine, item) for item in items], item i on replica i % D, in the items' order.

        Each replica runs its items one after another on its own thread; after an exception the
        replicas start no further item, and the first one raised is re-raised."""
        items = list(items)
        parts = split_round_robin(items, len(self.engines))
        if len(self.engines) == 1:
            return [fn(self.engines[0], item) for item in items]
        results: list[list | None] = [None] * len(self.engines)
        errors: list[BaseException | None] = [None] * len(self.engines)

        def work(i: int) -> None:
            try:
                out = []
                for item in parts[i]:
                    if any(e is not None for e in errors):
                        return
                    out.append(fn(self.engines[i], item))
                results[i] = out
            except BaseException as e:  # re-raised on the caller's thread
                errors[i] = e

        threads = [threading.Thread(target=work, args=(i,), name=f"engine-replica-{i}") for i in range(len(parts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for e in errors:
            if e is not None:
                raise e
        return merge_round_robin(results)

    def stats(self) -> list[dict]:
        return [engine.stats() for engine in self.engines]
