"""The paged span engine: a long-lived object that executes span plans.

    engine = Engine(load_model("smollm2-135m"), EngineConfig(num_pages=1024))
    request = engine.submit(plan, SamplingParams(max_tokens=64))
    engine.run_until_done()            # or call engine.step() from a serving loop
    request.text, request.summary()

`submit` / `step` are the serving interface (a server drives `step` from its
own loop and reads finished requests); `generate` and `run_query`
(spanjax/engine/executor.py) are conveniences on top. The engine owns the
device KV pool, the host page table (pages.py) and one step path (step.py):
the plain step, or the speculative one (speculative.py) when a speculator is
given; the path holds the scheduler and the jitted runner. It knows no CLI,
HTTP or experiment.

On a mesh (`EngineConfig.mesh`, e.g. "model=8"): the weights are sharded by the logical-axis
rules (spanjax/models/sharding.py), the KV pool by kv heads over `model`, span attention runs
per device on its own heads under `shard_map` (kernels/span_attention/sharded.py) and the
step is jitted with explicit in/out shardings. One engine is one `data` replica; `data` > 1
is `EngineReplicas` (replicas.py). No mesh (the default) is the single-device engine as is.
"""

from __future__ import annotations

import dataclasses
import time
import typing
from typing import Literal

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from spanjax.adapters import make_bank
from spanjax.compilation import compile_seconds, use_persistent_cache
from spanjax.engine.adapters import span_adapter_ids
from spanjax.engine.aot import StepPrograms
from spanjax.engine.pages import PagePool
from spanjax.engine.runner import StepRunner, StepShardings
from spanjax.engine.sampling import SamplingParams
from spanjax.engine.scheduler import Request, Scheduler
from spanjax.engine.speculative import SpeculativeRunner, SpeculativeScheduler, SpeculativeStep
from spanjax.engine.step import PlainStep, StepPath
from spanjax.kernels import cpu_library
from spanjax.kernels.quantized_matmul import with_lanes
from spanjax.kernels.span_attention import get_attention_impl
from spanjax.kernels.span_attention.sharded import shard_heads
from spanjax.models import llama
from spanjax.models import speculator as spec_model
from spanjax.models.loading import LoadedModel
from spanjax.models.sharding import MeshSpec, make_mesh, mesh_spec_of, put_global
from spanjax.query import ast as A
from spanjax.query.lower import lower
from spanjax.query.plan import SpanPlan

STEPS_DIR = "steps"  # traced engine steps (aot.py), under the compilation cache directory


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    num_pages: int = 1024  # KV pages in the pool (page 0 is reserved)
    page_size: int = 16
    max_tokens_per_step: int = 256  # token budget of one step (chunked prefill)
    max_seqs_per_step: int = 32  # ragged sequences per step (spans being encoded + decodes)
    max_running: int = 64  # requests admitted at once
    # "reference" (the jnp reference), "pallas", or "auto" (Pallas on GPU/TPU, the XLA path on CPU)
    attention: Literal["auto", "reference", "pallas"] = "auto"
    # The KV pool's dtype. "auto": bfloat16 for block-quantized (GGUF) weights, where decode
    # batches read more K/V than weights (8 streams after 512 tokens: 192 MB of fp32 K/V a step
    # against 97 MB of weights; 361 -> 442-453 tok/s in docs/results/engine_bench.md), as
    # llama.cpp keeps a 16-bit cache; float32 otherwise (dense weights, the exact reference).
    cache_dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    # The step's layer loop: "unrolled" (fastest per step on CPU, see Engine.__init__) or "scan"
    # (one `lax.scan` over the stacked weights: compiles ~10x faster for a 30-layer model, so
    # short runs and tests that meet many shape buckets spend less time compiling than running).
    layer_loop: Literal["unrolled", "scan"] = "unrolled"
    # Speculative decoding (spanjax/engine/speculative.py): a Hugging Face MLPSpeculator directory
    # (or pass a loaded Speculator to Engine); None = off.
    speculator: str | None = None
    num_speculative_tokens: int = 0  # draft tokens per decode step (0 = the speculator's n_predict)
    # Draft tree: head 0's top candidates, each continued greedily, verified side by side in one
    # forward (1 = the greedy draft alone). Extra candidates use free pages and leftover budget only:
    # "padding" = only the padding of the step's token bucket (the forward gets no wider: what a
    # compute-bound CPU wants), "budget" = up to max_tokens_per_step.
    speculative_candidates: int = 1
    speculative_tree_fill: Literal["padding", "budget"] = "padding"
    # JAX's persistent compilation cache (spanjax/compilation.py): a directory, "off", or None =
    # $SPANJAX_COMPILATION_CACHE, else the user's cache directory. Process-wide once set.
    compilation_cache: str | None = None
    # Device mesh: "data=D,model=M" (or a MeshSpec) over jax.devices(); None = one device (the
    # default device, no sharding). `model` splits heads, the MLP and the KV pool (tensor
    # parallelism); `data` > 1 is that many engine replicas (EngineReplicas, replicas.py).
    mesh: str | MeshSpec | None = None
    # Decode-sized products of block-quantized (GGUF) weights with int8 activations, as llama.cpp
    # computes them (kernels/quantized_matmul/lanes.py): ~2x faster products on AVX512-VNNI CPUs,
    # outputs no longer the dequantized model's fp32 ones (x's int8 rounding). Keeps a second,
    # lane-ordered copy of the quantized weights.
    int8_activations: bool = False
    # Block-quantized weights also kept in the lane layout (kernels/quantized_matmul/lanes.py),
    # which decode batches of 2-16 sequences read with fp32 activations: the same results, ~1.3x
    # faster products at eight rows on AVX512 (docs/results/engine_bench.md), for a second copy
    # of those weights in memory. One-sequence steps read the blocks either way.
    quantized_lanes: bool = True
    # fp32 weight matrices packed in column panels for the CPU products kernel
    # (kernels/packed_matmul), on one CPU device where the kernel library is built: 1.1-2x XLA's
    # GEMM from 1 to 512 rows on 2 cores (docs/results/products_bench.json), and the step skips the
    # padding rows of its token bucket. Takes the place of the unstacked copy (the same memory);
    # the values are the same, summed in another order.
    pack_weights: bool = True
    # Steady decoding one step ahead (engine/step.py PlainStep): the next decode step is dispatched
    # before this one's tokens reach the host, so the host's ~0.6-1.8 ms a step (scheduling,
    # padding, the call, appending tokens) overlaps the device's work. Same tokens either way.
    pipeline_decode: bool = True

    def __post_init__(self):
        if self.max_tokens_per_step < 16:
            raise ValueError("max_tokens_per_step must be >= 16")
        if self.max_seqs_per_step < 1 or self.max_running < 1:
            raise ValueError("max_seqs_per_step and max_running must be >= 1")
        # The Literal fields' options are their annotations (the YAML loader checks the same ones).
        for name, hint in typing.get_type_hints(EngineConfig).items():
            options = typing.get_args(hint) if typing.get_origin(hint) is Literal else None
            if options and getattr(self, name) not in options:
                raise ValueError(f"{name} must be {'|'.join(options)}, got {getattr(self, name)!r}")
        if self.num_speculative_tokens < 0:
            raise ValueError("num_speculative_tokens must be >= 0 (0 = the speculator's n_predict)")
        if self.speculative_candidates < 1:
            raise ValueError("speculative_candidates must be >= 1")
        if self.mesh is not None:
            mesh_spec_of(self.mesh)  # parses it: a bad mesh string fails here, naming itself

    @property
    def mesh_spec(self) -> MeshSpec | None:
        return None if self.mesh is None else mesh_spec_of(self.mesh)


def resolve_cache_dtype(cache_dtype: str, params) -> str:
    """`EngineConfig.cache_dtype` for these weights: "auto" is bfloat16 for block-quantized ones."""
    if cache_dtype != "auto":
        return cache_dtype
    return "bfloat16" if llama.has_quantized_weights(params) else "float32"


def _attention_impl(kind: str):
    """The span-attention implementation for the step: the dispatcher picks the
    Pallas kernel on GPU/TPU and the XLA path on CPU ("auto")."""
    return get_attention_impl("reference" if kind == "reference" else kind)


def _engine_mesh(config: EngineConfig, mesh: Mesh | None) -> Mesh | None:
    """The engine's mesh: `mesh` (a replica's (1, model) sub-mesh), else the config's; None
    for no mesh or a one-device one, which keeps the single-device engine exactly."""
    if mesh is None:
        spec = config.mesh_spec
        if spec is None or spec.num_devices == 1:
            return None
        if spec.data > 1:
            raise ValueError(
                f"EngineConfig.mesh {spec}: one Engine is one data replica; "
                f"EngineReplicas (spanjax/engine/replicas.py) runs data={spec.data} of them"
            )
        mesh = make_mesh(spec)
    if mesh.shape["data"] != 1:
        raise ValueError(f"an Engine's mesh must have data=1, got {mesh_spec_of(mesh)} (use EngineReplicas)")
    return mesh


class Engine:
    def __init__(
        self, model: LoadedModel, config: EngineConfig = EngineConfig(), speculator=None, mesh: Mesh | None = None
    ):
        """`mesh`: a (1, model) jax Mesh to run on instead of `config.mesh` (EngineReplicas
        passes each replica's slice)."""
        self.model = model
        self.config = config
        self.mesh = _engine_mesh(config, mesh)
        if self.mesh is not None and (speculator is not None or config.speculator is not None):
            raise ValueError("speculative decoding does not run on a mesh yet (EngineConfig.mesh with a speculator)")
        if self.mesh is not None and llama.has_quantized_weights(model.params):
            raise ValueError("block-quantized weights run on one device: load the model without quantized=True")
        self.compilation_cache = use_persistent_cache(config.compilation_cache)
        # The step's weights, unstacked: the decoder unrolls its layer loop. A `lax.scan` over
        # stacked weights copies each layer's slice out of the stack on every step (XLA CPU
        # cannot hand a dot a slice of a buffer): measured on SmolLM2-135M, 2-core CPU, the
        # copies were ~7 ms of a one-stream fp32 decode step, and bf16 slices were converted to
        # fp32 as well (155 ms per step scanned vs 47 ms unrolled). Unstacking copies the
        # weights once (the LoadedModel keeps its stacked ones); block-quantized layers, and fp32
        # ones packed in panels for the C++ products kernel (`pack_weights`, one CPU device), are
        # unrolled over in place (`llama.UnrolledLayers`: the kernels read a layer of the stack at
        # an offset). `layer_loop="scan"` keeps them stacked: slower steps, much faster compilation.
        pack = config.pack_weights and self.mesh is None and jax.default_backend() == "cpu" and cpu_library.available()
        unrolled = config.layer_loop == "unrolled"
        self.params = llama.unstack_layers(model.params, pack_matrices=pack) if unrolled else model.params
        quantized = llama.has_quantized_weights(model.params)
        if config.int8_activations and not quantized:
            raise ValueError("int8_activations needs block-quantized weights (a GGUF model loaded quantized)")
        if quantized and (config.int8_activations or config.quantized_lanes):
            self.params = with_lanes(self.params, int8_activations=config.int8_activations)
        self.pool = PagePool(config.num_pages, config.page_size)
        cache_dtype = jnp.dtype(resolve_cache_dtype(config.cache_dtype, model.params))
        init_cache = lambda: llama.init_paged_cache(model.cfg, config.num_pages, config.page_size, cache_dtype)
        self.shardings = None if self.mesh is None else StepShardings.build(model.cfg, self.params, self.mesh)
        if self.shardings is None:
            self.cache = init_cache()
        else:  # made in place on the mesh: the whole pool never sits on one device
            self.params = put_global(self.params, self.shardings.params)  # also across processes (multi-host)
            self.cache = jax.jit(init_cache, out_shardings=self.shardings.cache)()
        if speculator is None and config.speculator is not None:
            speculator = spec_model.load_hf(config.speculator, model.params.embed.dtype)
        self.speculator = speculator  # spanjax.models.speculator.Speculator, or None
        # End-of-sequence ids: the config's and the tokenizer's (chat end-of-turn included).
        self.eos_token_ids = frozenset(model.cfg.eos_token_ids) | frozenset(
            getattr(model.tokenizer, "eos_token_ids", ())
        )
        self.step_path: StepPath = self._plain_step() if speculator is None else self._speculative_step(speculator)
        # Step programs an earlier process traced for this engine are compiled now (persistent-cache
        # reads), at construction rather than inside the first request's TTFT (aot.py).
        t0 = time.perf_counter()
        self.programs_preloaded = self.runner.preload(self.params, self.cache) if speculator is None else 0
        self.preload_s = time.perf_counter() - t0
        self._compile_seconds_at_start = compile_seconds()
        self.steps = 0
        self.adapters: dict = {}  # name -> spanjax.adapters.Adapter (register_adapter)
        self._bank = None  # the registered adapters stacked for the step (spanjax.adapters.AdapterBank)

    def _plain_step(self) -> PlainStep:
        config = self.config
        scheduler = Scheduler(self.pool, config.max_tokens_per_step, config.max_seqs_per_step, config.max_running)
        runner = StepRunner(
            self.model.cfg,
            config.max_tokens_per_step,
            config.max_seqs_per_step,
            max_pages_per_seq=self.pool.capacity,
            attention_impl=self._attention(),
            shardings=self.shardings,
            # One device only (a mesh's step carries shardings the stored program does not).
            programs=StepPrograms(
                self.compilation_cache / STEPS_DIR, "step", context=repr((self.model.cfg, config.attention))
            )
            if self.compilation_cache is not None and self.mesh is None
            else None,
        )
        return PlainStep(scheduler, runner, self.model.tokenizer, self.eos_token_ids, pipeline=config.pipeline_decode)

    def _attention(self):
        """The step's span attention; on a mesh with model > 1, per device on its own heads."""
        impl = _attention_impl(self.config.attention)
        if self.mesh is None or self.mesh.shape["model"] == 1:
            return impl
        return shard_heads(impl, self.mesh, "model")

    def _speculative_step(self, speculator: spec_model.Speculator) -> SpeculativeStep:
        sc, cfg, config = speculator.config, self.model.cfg, self.config
        if (sc.emb_dim, sc.vocab_size) != (cfg.hidden_size, cfg.vocab_size):
            raise ValueError(
                f"speculator has emb_dim {sc.emb_dim}, vocab {sc.vocab_size}; "
                f"the model {cfg.hidden_size}, {cfg.vocab_size}"
            )
        k = min(config.num_speculative_tokens or sc.n_predict, sc.n_predict)
        spec_params = spec_model.draft_params(speculator.params)
        c = min(config.speculative_candidates, len(spec_params.head_ids[0]))  # head 0 ranks its distinct columns
        runner = SpeculativeRunner(
            cfg,
            sc,
            k,
            c,
            config.max_tokens_per_step,
            config.max_seqs_per_step,
            max_pages_per_seq=self.pool.capacity,
            attention_impl=_attention_impl(config.attention),
        )
        scheduler = SpeculativeScheduler(
            self.pool,
            config.max_tokens_per_step,
            config.max_seqs_per_step,
            config.max_running,
            num_draft=k,
            token_buckets=runner.token_buckets if config.speculative_tree_fill == "padding" else None,
        )
        return SpeculativeStep(scheduler, runner, self.model.tokenizer, self.eos_token_ids, spec_params)

    @property
    def scheduler(self) -> Scheduler:
        return self.step_path.scheduler

    @property
    def runner(self) -> StepRunner:
        return self.step_path.runner

    @property
    def spec_stats(self) -> dict[str, int] | None:
        """Speculative decoding counters (verify_forwards, emitted, drafted, accepted,
        other_candidate_won) since the engine started; None without a speculator."""
        return self.step_path.spec_stats if isinstance(self.step_path, SpeculativeStep) else None

    # -- submission ---------------------------------------------------------------

    def submit(
        self,
        plan: SpanPlan,
        sampling: SamplingParams = SamplingParams(),
        keep_logits: bool = False,
        write_final_token: bool = False,
        prefill: bool = False,
    ) -> Request:
        """Queue one generation. Raises before any compute if it can never fit.

        `write_final_token`: once finished, the request stays one more step to write its last
        token's K/V and publish its final page, so a query that re-sends the exchange (the outer
        query of a nested g) hits all of it; waiting requests are admitted after that step.
        `prefill`: only encode the plan into the cache (its pages are published for later
        queries); nothing is sampled and the request finishes with reason "prefill"."""

        if plan.model != self.model.name:
            raise ValueError(f"plan was lowered for model {plan.model!r}, engine runs {self.model.name!r}")
        end = max(max(s.positions) for s in plan.spans) + (0 if prefill else sampling.max_tokens)
        if end >= self.model.cfg.max_position_embeddings:
            raise ValueError(
                f"prompt and max_tokens reach position {end}, past the model's context of "
                f"{self.model.cfg.max_position_embeddings}"
            )
        span_adapter = None
        if plan.adapter is not None:  # aLoRA: only spans from the invocation on are adapted
            names = list(self.adapters)
            plan, span_adapter = span_adapter_ids(
                plan, self.adapters.get(plan.adapter), names.index(plan.adapter) if plan.adapter in names else -1
            )
        req = Request(
            plan,
            sampling,
            span_adapter=span_adapter,
            keep_logits=keep_logits,
            write_final_token=write_final_token,
            prefill=prefill,
        )
        self.scheduler.add(req)
        return req

    # -- stepping -------------------------------------------------------------------

    def abort(self, request: Request) -> bool:
        """Stop a request between steps (a dropped client, a timeout): its pages are released at
        once and it finishes with `finish_reason` "abort". False if it had already finished."""
        return self.scheduler.abort(request)

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def step(self) -> list[Request]:
        """Run one batch (the one dispatched ahead, if any); returns the requests that finished in it."""
        batch = None
        if self.step_path.in_flight is None:
            batch = self.scheduler.schedule()
            if batch is None:
                return []
        self.cache, finished = self.step_path.run(self.params, self.cache, batch, self._bank)
        self.steps += 1
        return finished

    def run_until_done(self, requests: list[Request] | None = None) -> None:
        """Step until the given requests (default: all) have finished, including the step that
        writes the last token of those submitted with `write_final_token`: that write is part of
        their work (their pages are complete when this returns), not of what runs next."""
        running = self.scheduler.running
        while self.has_work() and (
            requests is None or not all(r.finished for r in requests) or any(r in running for r in requests)
        ):
            self.step()

    def generate(
        self, plans: list[SpanPlan], sampling: SamplingParams | list[SamplingParams] = SamplingParams()
    ) -> list[Request]:
        samplings = sampling if isinstance(sampling, list) else [sampling] * len(plans)
        reqs = [self.submit(p, s) for p, s in zip(plans, samplings)]
        self.run_until_done(reqs)
        return reqs

    def warmup(self, prompt_tokens: tuple[int, ...] = (64, 512), streams: tuple[int, ...] = (1,), new_tokens: int = 3):
        """Compile the steps that requests of about these prompt lengths and concurrent stream
        counts will run (prefill chunks, then decode), off any request's clock, by running
        synthetic ones (a repeated filler text, eos ignored). The pages they cached are dropped and
        the counters restored, so the engine looks untouched. Returns {seconds, compilations}.

        With the persistent compilation cache a warm-up in a later process only traces."""
        if self.scheduler.has_work():
            raise RuntimeError("warmup() needs an idle engine")
        t0, compiled, steps = time.perf_counter(), self.runner.compile_count, self.steps
        stats = dataclasses.replace(self.pool.stats)
        tok, filler = self.model.tokenizer, "Warm the engine up with a sentence of ordinary words. "
        per_sentence = max(1, len(tok.encode(filler)))
        for n_prompt in prompt_tokens:
            for n_streams in streams:
                plans = [
                    lower(
                        A.G(model=self.model.name, input=A.user(f"{i} " + filler * max(1, n_prompt // per_sentence))),
                        tok,
                        model=self.model.name,
                        page_size=self.config.page_size,
                    )
                    for i in range(n_streams)
                ]
                self.generate(plans, SamplingParams(max_tokens=new_tokens, ignore_eos=True))
                self.clear_cache()
        self.pool.stats, self.steps = stats, steps
        return {"seconds": time.perf_counter() - t0, "compilations": self.runner.compile_count - compiled}

    def register_adapter(self, name: str, adapter) -> None:
        """Make a LoRA / aLoRA adapter (spanjax.adapters.Adapter) available to plans and g's
        naming it. Registering again under a name replaces it; pages cached under that
        name are dropped first so no stale adapted KV is reused."""
        if name in self.adapters:
            if self.scheduler.has_work():
                raise RuntimeError(f"cannot replace adapter {name!r} while requests are running")
            self.clear_cache()
        self.adapters[name] = adapter
        self._bank = self._make_bank()

    def unregister_adapter(self, name: str) -> None:
        """Remove an adapter and every cached page (pages keyed with it must not outlive it).
        Refused while any adapted request runs: requests hold indices into the adapter bank,
        and removing one shifts the indices after it."""
        if name not in self.adapters:
            raise KeyError(f"adapter {name!r} is not registered; the engine has {sorted(self.adapters) or 'none'}")
        busy = [r for r in self.scheduler.running + list(self.scheduler.waiting) if r.span_adapter is not None]
        if busy:
            raise RuntimeError(f"cannot remove adapter {name!r}: {len(busy)} adapted requests are running or waiting")
        self.clear_cache()
        del self.adapters[name]
        self._bank = self._make_bank()

    def _make_bank(self):
        """The registered adapters stacked for the step (None if none); on a mesh, replicated
        over it, where the step takes it."""
        if not self.adapters:
            return None
        bank = make_bank(list(self.adapters.values()), self.model.cfg, self.model.params.embed.dtype)
        return bank if self.shardings is None else put_global(bank, self.shardings.replicated)

    def clear_cache(self) -> int:
        """Forget every cached page no running request uses (cold-start runs)."""
        return self.pool.drop_cached()

    def stats(self) -> dict:
        st = self.pool.stats
        return {
            "steps": self.steps,
            "compilations": self.runner.compile_count,
            # traced steps read back from disk (aot.py): each one a trace saved
            "programs_loaded": self.runner.programs.loaded if self.runner.programs else 0,
            "programs_preloaded": self.programs_preloaded,  # of those, compiled at construction:
            "preload_s": round(self.preload_s, 3),  # seconds it took (not in trace_s / compile_s)
            "compile_bound": self.runner.compile_bound,
            # Seconds of tracing and of XLA compilation (persistent-cache reads included) in this
            # process since the engine was made: the part of a first TTFT that is not the model's.
            **{k: round(v - self._compile_seconds_at_start[k], 3) for k, v in compile_seconds().items()},
            "cached_pages": self.pool.num_cached(),
            "hit_tokens": st.hit_tokens,
            "miss_tokens": st.miss_tokens,
            "evictions": st.evictions,
            **self.step_path.stats(),
        }
