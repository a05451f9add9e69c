"""Engine steps kept on disk as exported programs, so a second process does not trace them.

JAX's persistent compilation cache (spanjax/compilation.py) removes XLA compilation from a
second process, but not tracing the model into a program, which for the SmolLM2 step costs
~0.4-0.7 s of the first query's TTFT. `StepPrograms` keeps each step bucket's traced program
on disk (`jax.export`, StableHLO) keyed on everything that can change it: the package's
source, the JAX version and the devices, and the structure, shapes and dtypes of every
argument. A process that finds the file wraps it in a jit that only lowers the stored
program (milliseconds), and the persistent cache supplies the compiled executable: no trace,
no compile (`StepRunner.compile_count` does not move).

Why programs, not compiled executables: an XLA CPU executable serialized with
`jax.experimental.serialize_executable` failed when loaded in another process
("Function wrapped_iota not found"); the persistent cache's own executables load fine.

The program is exported over the flattened arguments (arrays only), so no pytree node needs
a serialization registry; the output structure is pickled beside it. A file that cannot be
read back is re-exported and replaced; writes go through a temporary file and a rename.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import os
import pickle
import tempfile
import weakref
from pathlib import Path

import jax
from jax import export

from spanjax.kernels import cpu_library

log = logging.getLogger("spanjax.engine")

FORMAT = 2  # bump when the file layout changes


@functools.cache
def source_digest() -> str:
    """sha256 over the package's Python sources (spanjax and its kernels): a changed step
    function must never run a program traced from the old one."""
    import spanjax
    import spanjax.kernels

    h = hashlib.sha256()
    roots = sorted({Path(spanjax.__file__).parent, Path(spanjax.kernels.__file__).parent})
    for root in roots:
        for path in sorted([*root.rglob("*.py"), *root.rglob("*.cc"), *root.rglob("*.h")]):  # C++: the FFI kernels
            h.update(str(path.relative_to(root)).encode())
            h.update(path.read_bytes())
    return h.hexdigest()


def _leaf_signature(x) -> tuple:
    if hasattr(x, "shape") and hasattr(x, "dtype"):  # jax and numpy arrays
        return (tuple(x.shape), str(x.dtype), bool(getattr(x, "weak_type", False)))
    return ("py", type(x).__name__, repr(x))


def signature(args) -> tuple:
    """What a traced step depends on in its arguments: tree structure (static fields
    included) and every leaf's shape and dtype."""
    leaves, tree = jax.tree_util.tree_flatten(args)
    return (str(tree), tuple(_leaf_signature(x) for x in leaves))


# At most this many stored programs are compiled at construction, the most recently loaded
# first: each compiled program holds its own code sections (~900 memory maps for the unrolled
# SmolLM2 step), and a directory that collected every bucket of many runs (70 in one scope
# was seen) exhausted the process's map limit (vm.max_map_count, 65530) and LLVM aborted it.
# The others compile on first use, from the persistent cache.
PRELOAD_MAX = 24
# A process keeps at most this many loaded programs, across all its engines (`keep_loaded`
# drops the least recently used): dropping one frees its maps, and a long process that meets
# many buckets stays under the limit. A bound per engine was not enough: a benchmark holding
# nine engines (three weight formats x three pools) reached the limit and LLVM aborted it.
LOADED_MAX = 32
# (id of a runner's dict of loaded programs, bucket key) -> a weak reference to that dict,
# least recently used first.
_loaded: collections.OrderedDict = collections.OrderedDict()


def keep_loaded(stored: dict, key) -> None:
    """Mark `stored[key]` (one runner's loaded program) the most recently used in this process;
    beyond LOADED_MAX loaded programs, drop the least recently used from its runner's dict (it
    loads again from disk if needed). Entries of runners that are gone are dropped first."""
    for ident in [i for i, ref in _loaded.items() if ref() is None]:
        del _loaded[ident]
    ident = (id(stored), key)
    _loaded.pop(ident, None)
    _loaded[ident] = weakref.ref(stored)
    while len(_loaded) > LOADED_MAX:
        (_, old_key), ref = _loaded.popitem(last=False)
        holder = ref()
        if holder is not None:
            holder.pop(old_key, None)


class StepPrograms:
    """Exported programs of one step function on disk, one file per argument signature.

    Files are named `<name>-<scope>-<bucket>.bin`: the scope hashes what is fixed for one
    engine (source, JAX, devices, the model config and attention implementation, the weights'
    and pool's signature), the bucket the rest of
    the arguments. `load_or_export(fn, args, bucket, donate)` returns a callable with `fn`'s
    signature: the stored program under a jit that donates the leaves of the arguments in
    `donate`. `preload(fixed)` compiles every program stored for a scope up front (the
    persistent cache supplies the executables), off the clock of the first request."""

    def __init__(self, directory: str | Path, name: str, context: str = ""):
        """`context`: what the step closes over besides its arguments (the model config, the
        attention implementation): constants baked into the program, so part of its key."""
        self.directory = Path(directory)
        self.name, self.context = name, context
        self.loaded = 0  # programs read back from disk (each one a trace saved)
        self.written = 0

    def _scope(self, fixed) -> str:
        devices = [(d.platform, d.device_kind) for d in jax.devices()]
        # A step traces to the C++ CPU kernels only where they are available (and registering
        # them here is what lets a stored program that calls them run in a fresh process), and
        # to the int8 products only where the CPU has VNNI (a cache directory may be shared).
        on_cpu = "cpu" in {d.platform for d in jax.devices()}
        kernel = (cpu_library.available(), cpu_library.vnni_supported()) if on_cpu else None
        key = repr(
            (FORMAT, self.name, self.context, jax.__version__, devices, source_digest(), signature(fixed), kernel)
        )
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def path(self, fixed, bucket) -> Path:
        b = hashlib.sha256(repr(bucket).encode()).hexdigest()[:16]
        return self.directory / f"{self.name}-{self._scope(fixed)}-{b}.bin"

    def load_or_export(self, fn, args, fixed: int, bucket, donate: tuple[int, ...] = ()):
        """`args[:fixed]` are the engine's fixed arguments (weights, pool), `bucket` the key of
        the rest (its signature)."""
        path = self.path(args[:fixed], bucket)
        stored = self._read(path)
        if stored is None:
            stored = self._export(fn, args, bucket, donate, path)
        exported, out_tree, _, donated = stored
        return _callable(exported, out_tree, donated)

    def preload(self, fixed, limit: int = PRELOAD_MAX) -> dict:
        """bucket -> step for the `limit` most recently loaded programs stored for these fixed
        arguments, each compiled now."""
        out = {}
        paths = self.directory.glob(f"{self.name}-{self._scope(fixed)}-*.bin")
        for path in sorted(paths, key=_mtime, reverse=True)[:limit]:
            stored = self._read(path)
            if stored is not None:
                exported, out_tree, bucket, donated = stored
                out[bucket] = _callable(exported, out_tree, donated)
        return out

    def _read(self, path: Path):
        if not path.exists():
            return None
        try:
            blob, out_tree, bucket, donated = pickle.loads(path.read_bytes())
            stored = export.deserialize(bytearray(blob)), out_tree, bucket, donated
            self.loaded += 1
        except Exception as e:  # noqa: BLE001  (unreadable: export again and replace it)
            log.warning("re-tracing %s: its stored program did not load (%s)", path.name, e)
            return None
        try:
            os.utime(path)  # last load (preload or first use), for preload's order
        except OSError:
            pass  # a read-only cache still serves
        return stored

    def _export(self, fn, args, bucket, donate, path: Path):
        leaves, in_tree = jax.tree_util.tree_flatten(args)
        donated = tuple(i for i, j in enumerate(_leaf_owner(args)) if j in donate)
        out_tree = None

        def flat(*xs):
            nonlocal out_tree
            out, out_tree = jax.tree_util.tree_flatten(fn(*jax.tree_util.tree_unflatten(in_tree, xs)))
            return out

        # Our own FFI targets carry no cross-version guarantee; the scope key (sources, jax
        # version) already ties a stored program to the build that made it.
        own = [export.DisabledSafetyCheck.custom_call(t) for t in cpu_library.TARGETS]
        exported = export.export(jax.jit(flat, donate_argnums=donated), disabled_checks=own)(*leaves)
        try:
            blob = pickle.dumps((bytes(exported.serialize()), out_tree, bucket, donated))
            self.directory.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=self.directory, prefix=path.name, suffix=".tmp")
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, path)
            self.written += 1
        except Exception as e:  # noqa: BLE001  (a cache: a failed write costs the next process a trace)
            log.warning("could not store the step program %s: %s", path.name, e)
        return exported, out_tree, bucket, donated


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:  # removed meanwhile (another process replacing it)
        return 0.0


def _callable(exported, out_tree, donated):
    """The stored program as a step: flattened arguments in, the step's output tree out.
    Lowered from the program's own avals and compiled now, the same way in every process, so
    the persistent cache key is the same too."""
    call = jax.jit(exported.call, donate_argnums=donated).lower(*exported.in_avals).compile()
    # The weights come back every step as the same object; their ~700 leaves are flattened
    # once, not per step (~0.3 ms of a ~15 ms SmolLM2 decode step on 2 cores). Parameter pytrees
    # are immutable (flax.struct), so the same object has the same leaves.
    last_params = [None, ()]

    def step(params, *rest):
        if last_params[0] is not params:
            last_params[:] = [params, tuple(jax.tree_util.tree_leaves(params))]
        return jax.tree_util.tree_unflatten(out_tree, call(*last_params[1], *jax.tree_util.tree_leaves(rest)))

    return step


def _leaf_owner(args) -> list[int]:
    """For each flattened leaf of the argument tuple, the index of the argument it belongs to."""
    return [i for i, a in enumerate(args) for _ in jax.tree_util.tree_leaves(a)]
