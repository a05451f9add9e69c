"""The jitted engine step: one forward over a flat ragged batch, then sampling.

Shapes are bucketed so the step compiles a bounded number of times:

- tokens T: powers of two from 16 up to the token budget (the budget itself is
  the last bucket); a decode-only batch (at most one token per sequence) uses
  T = S instead, in its own trace (`max_q_len`), so no bucket is added;
- sequences S: powers of two from 1 up to `max_seqs_per_step` (padded
  sequences are empty; bucketing them keeps the attention's per-sequence work
  proportional to the real sequences);
- block-table width M: powers of two from 4 up to the widest sequence the pool
  allows (`num_pages - 1`, rounded up to a power of two); decode-only batches also
  use the midpoints (6, 12, 24, 48, ...: `decode_page_buckets`), because their
  attention reads every entry of the bucketed width (see `decode_page_buckets`).

So at most len(T) x len(S) x len(M) prefill and len(S) x len(M_decode) decode
compilations (`compile_bound`); in practice a workload touches a handful.
`compile_count` counts the traces that actually happened.

On a mesh (`StepShardings`, built by the Engine for an `EngineConfig.mesh`) the step is
jitted with explicit in/out shardings: weights by the logical-axis rules, the KV pool by kv
heads, the host inputs replicated, the sampled ids replicated and the logits split like the
vocabulary; the cache is donated as on one device. Without one the step is the plain jit.
"""

from __future__ import annotations

import collections
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from spanjax.engine import aot
from spanjax.engine.aot import StepPrograms
from spanjax.engine.sampling import SamplingRows, sampling_arrays
from spanjax.engine.scheduler import StepBatch, StepItem
from spanjax.models import llama
from spanjax.models import sharding as shd


@dataclasses.dataclass(frozen=True)
class StepShardings:
    """Where the step's arguments and results live on `mesh` (inference rules)."""

    mesh: Mesh
    params: object  # pytree of NamedShardings, the shape of the engine's params
    cache: llama.PagedKVCache  # of NamedShardings: kv heads over `model`
    logits: NamedSharding  # [S, V]: the vocabulary's split (replicated when uneven)
    replicated: NamedSharding

    @classmethod
    def build(cls, cfg, params, mesh: Mesh) -> StepShardings:
        """Checks the model divides the mesh (an error names the config field)."""
        vocab = shd.resolve_rules(cfg, "inference", mesh)["vocab"]
        return cls(
            mesh=mesh,
            params=shd.named_shardings(shd.param_partition_specs(cfg, params, "inference", mesh), mesh),
            cache=shd.named_shardings(shd.cache_partition_specs(cfg, "inference", mesh), mesh),
            logits=NamedSharding(mesh, PartitionSpec(None, vocab)),
            replicated=NamedSharding(mesh, PartitionSpec()),
        )


def power_of_two_buckets(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    out.append(max(hi, lo))
    return out


def sampling_rows(items: list[StepItem], pad_to: int) -> SamplingRows:
    """The step's per-sequence sampling inputs (temperature, top_k, top_p, seeds, steps), each
    [pad_to] (padding rows greedy): every item's request's parameters and the index of the token
    it samples next, which its seeded draw folds in. Both step paths take them from here."""
    temperature, top_k, top_p, seeds = sampling_arrays([it.request.sampling for it in items], pad_to)
    steps = np.zeros(pad_to, np.int32)
    steps[: len(items)] = [len(it.request.generated) + it.pending for it in items]
    return SamplingRows(temperature, top_k, top_p, seeds, steps)


def with_midpoints(buckets: list[int]) -> list[int]:
    """`buckets` plus 1.5x each one that falls strictly before the next: [4, 8, 16] ->
    [4, 6, 8, 12, 16]. A single bucket stays single."""
    mids = {b * 3 // 2 for b, nxt in zip(buckets, buckets[1:]) if b < b * 3 // 2 < nxt}
    return sorted(set(buckets) | mids)


def _bucket(n: int, buckets: list[int]) -> int:
    for b in buckets:
        if n <= b:
            return b
    raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")


class StepRunner:
    def __init__(
        self,
        cfg,
        max_tokens: int,
        max_seqs: int,
        max_pages_per_seq: int,
        attention_impl=None,
        shardings: StepShardings | None = None,
        programs: StepPrograms | None = None,
    ):
        self.cfg = cfg
        self.max_seqs = max_seqs
        # A step's weight products cost its padded token count: from 32 tokens up the buckets
        # have midpoints (48, 96, 192, 384), so padding wastes at most a third, not half. A cold
        # 48-token question step (system prompt and question, SmolLM2, 2 cores) ran 89-92 ms padded
        # to 64 and 73-77 ms at 48. Below 32 the step costs about what streaming the weights
        # costs whatever the rows, and more buckets would only mean more compilations.
        powers = power_of_two_buckets(16, max_tokens)
        self.token_buckets = [b for b in with_midpoints(powers) if b in powers or b > 32]
        self.seq_buckets = power_of_two_buckets(1, max_seqs)
        self.page_buckets = power_of_two_buckets(4, 1 << max(2, (max_pages_per_seq - 1).bit_length()))
        self.compile_count = 0
        self._attention_impl = attention_impl
        self.shardings = shardings
        # Traced steps stored on disk (aot.py): a second process neither traces nor compiles.
        self.programs = programs
        # bucket signature -> the stored program's step (when `programs` is set), least recently used first
        self._stored: collections.OrderedDict = collections.OrderedDict()
        # On a mesh spanning processes (multi-host) a process can read only an array it holds
        # whole: the logits are gathered (replicated) before the host reads them, when kept.
        self._gather_logits = None
        if shardings is not None and shd.spans_processes(shardings.mesh):
            self._gather_logits = jax.jit(lambda x: x, out_shardings=shardings.replicated)
        if shardings is None:
            self._step = jax.jit(self._step_impl, donate_argnums=(1,))
        else:
            r = shardings.replicated  # tokens, positions, meta, logits_indices, sampling, prev, pending, adapter, ids
            self._step = jax.jit(
                self._step_impl,
                donate_argnums=(1,),
                in_shardings=(shardings.params, shardings.cache, r, r, r, r, r, r, r, r, r),
                out_shardings=(r, shardings.logits, shardings.cache),
            )

    def seq_bucket(self, n: int) -> int:
        """The sequence bucket a batch of `n` items is padded to."""
        return _bucket(n, self.seq_buckets)

    @property
    def decode_page_buckets(self) -> list[int]:
        """Block-table widths of decode-only batches: `page_buckets` and their midpoints.

        Decode attention has no loop: it gathers, rotates and multiplies the whole bucketed
        width at once (`decode_attention`), so padding costs in proportion, and more than that
        once the gathered K/V stop fitting in cache. SmolLM2-135M bf16, 8 streams of ~36 pages,
        2 cores: 38-40 ms a step at width 40 or 48, 50-55 ms at 64. A loop over page groups
        instead (work in proportion to the pages used, no extra trace) measured slower than
        width 64. Prefill keeps the power-of-two widths: its loop walks only the groups used."""
        return with_midpoints(self.page_buckets)

    @property
    def compile_bound(self) -> int:
        prefill = len(self.token_buckets) * len(self.seq_buckets) * len(self.page_buckets)
        return prefill + len(self.seq_buckets) * len(self.decode_page_buckets)

    def _step_impl(
        self,
        params,
        cache,
        tokens,
        positions,
        meta,
        logits_indices,
        sampling: SamplingRows,
        prev_ids,
        pending,
        adapter=None,
        adapter_ids=None,
    ):
        self.compile_count += 1  # runs once per trace, i.e. per compilation
        # A pipelined decode step's tokens are the previous step's samples, still on the device:
        # token row r takes prev_ids[pending[r]] where pending[r] >= 0 (StepBatch.pending_src).
        tokens = jnp.where(pending >= 0, prev_ids[jnp.maximum(pending, 0)], tokens)
        # Padding tokens follow the real ones (`padded_inputs`): the packed products skip them.
        hidden, cache = llama.forward_paged(
            params,
            self.cfg,
            tokens,
            positions,
            cache,
            meta,
            self._attention_impl,
            adapter,
            adapter_ids,
            rows=meta.cu_q_lens[-1],
        )
        logits = llama.compute_logits(params, self.cfg, hidden[logits_indices])
        next_ids = sampling.sample(logits)
        return next_ids, logits, cache

    def run(self, params, cache, batch: StepBatch, adapter=None, prev_ids=None):
        """Pad `batch` to its bucket and run the step. Returns (next ids [S], logits [S, V], cache).

        `adapter` (an AdapterBank) applies per token by `batch.adapter_ids`; a
        batch with no adapted token runs the plain step (a separate trace). `prev_ids`: the
        previous step's next ids (device), which a pipelined batch's pending tokens take."""
        inputs, sampling, extra = self.padded_inputs(batch, adapter)
        if self.shardings is not None and not extra:
            extra = (None, None)  # in_shardings name all eleven arguments
        T, S = len(inputs[0]), len(inputs[3])
        pending = np.full(T, -1, np.int32)
        if batch.pending_src is not None:
            if prev_ids is None or prev_ids.shape != (S,):
                raise ValueError("a pipelined batch needs the previous step's ids, of its own bucket")
            pending[: len(batch.pending_src)] = batch.pending_src
        else:
            prev_ids = np.zeros(S, np.int32)
        args = (params, cache, *inputs, sampling, prev_ids, pending, *extra)
        next_ids, logits, cache = self._step_for(args)(*args)
        if self._gather_logits is not None and any(it.request.keep_logits for it in batch.items):
            logits = self._gather_logits(logits)
        return next_ids, logits, cache

    def _step_for(self, args):
        """The jitted step, or with stored programs the one stored for these shapes."""
        if self.programs is None:
            return self._step
        key = aot.signature(args[2:])  # the bucket: weights and pool are fixed per engine
        step = self._stored.pop(key, None)
        if step is None:
            step = self.programs.load_or_export(self._step_impl, args, fixed=2, bucket=key, donate=(1,))
        self._keep(key, step)
        return step

    def _keep(self, key, step) -> None:
        """Remember a loaded program as the most recently used; beyond `aot.LOADED_MAX` in the
        process the least recently used is dropped (its memory maps freed; it loads again from
        disk if needed)."""
        self._stored[key] = step
        aot.keep_loaded(self._stored, key)

    def preload(self, params, cache) -> int:
        """Compile every step program stored for this engine's weights and pool (aot.py), so the
        first requests find them ready. Returns how many."""
        if self.programs is None:
            return 0
        stored = self.programs.preload((params, cache))
        for key, step in stored.items():
            self._keep(key, step)
        return len(stored)

    def padded_inputs(self, batch: StepBatch, adapter=None):
        """Bucketed step inputs: ((tokens, positions, meta, logits_indices), SamplingRows,
        () or (adapter, adapter_ids))."""
        s_real, m_real = batch.block_tables.shape
        S = self.seq_bucket(s_real)
        decode_only = np.diff(batch.cu_q_lens).max(initial=0) <= 1
        M = _bucket(m_real, self.decode_page_buckets if decode_only else self.page_buckets)
        # A decode-only batch has at most one token per sequence, so it is padded to S tokens,
        # not to the smallest token bucket: on CPU a weight GEMM over 16 rows costs ~2.5x one
        # over 1 row (SmolLM2-135M fp32, 2 cores: 31 vs 13 ms for the layers' GEMMs), and
        # decode-only batches have their own trace anyway (`max_q_len`).
        T = S if decode_only else _bucket(len(batch.tokens), self.token_buckets)

        def pad1(x, n, fill=0):
            return np.concatenate([x, np.full(n - len(x), fill, x.dtype)])

        def pad2(x, fill=0, dtype=np.int32):
            if x is None:  # no re-weighting: the plain program
                return None
            out = np.full((S, M), fill, dtype)
            out[:s_real, :m_real] = x
            return out

        meta = llama.SpanBatchMeta(
            slot_mapping=pad1(batch.slot_mapping, T, -1),
            block_tables=pad2(batch.block_tables),
            block_pos=pad2(batch.block_pos),
            block_lens=pad2(batch.block_lens),
            cu_q_lens=pad1(batch.cu_q_lens, S + 1, batch.cu_q_lens[-1]),
            block_logit_scale=pad2(batch.block_logit_scale, 1.0, np.float32),
            block_logit_bias=pad2(batch.block_logit_bias, 0.0, np.float32),
            # Decode-only batches get their own trace, which attention computes per sequence.
            max_q_len=1 if decode_only else None,
        )
        ids = batch.adapter_ids
        if adapter is None or ids is None or not (ids >= 0).any():
            ids = None
        inputs = (pad1(batch.tokens, T), pad1(batch.positions, T), meta, pad1(batch.logits_indices, S))
        sampling = sampling_rows(batch.items, S)
        return inputs, sampling, (() if ids is None else (adapter, pad1(ids, T, -1)))
