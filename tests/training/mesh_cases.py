"""Training on a mesh, run in a subprocess with fake CPU devices (the test process has already
started JAX with one device): `python tests/training/mesh_cases.py SCENARIO OUT_DIR`.

Scenarios (each writes OUT_DIR/result.json, compared by tests/training/test_mesh_training.py
and tests/training/test_multihost.py):

- `mesh` (8 devices): a 4-step aLoRA run (dropout on, so the step's random key matters) on one
  device, on data=2,model=4 and on data=8,model=1; a speculator (its trained params and
  optimizer state sharded) on one device and on data=2,model=4; the aLoRA run saved on
  data=2,model=4, killed after its step-2 checkpoint and resumed on data=1,model=8; and
  `Checkpointer.restore` onto explicit abstract targets on another mesh.
- `multihost`: what every process of a multi-host run computes on the global data=2,model=4
  mesh (spanjax.distributed.initialize() reads the environment: two processes with 4 devices
  each, or one process with 8): `CHECKS` in order (training steps, a sharded forward, and an
  engine on the global (1, 8) mesh), process 0 writing their results. Add a check to `CHECKS`
  (and its name to test_multihost.py's `COMPARED`) to compare it too.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from spanjax import distributed

if __name__ == "__main__" and sys.argv[1] == "multihost":
    distributed.initialize(timeout_s=120)  # before JAX starts its backend; no-op without the env

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from spanjax.adapters import load_peft  # noqa: E402
from spanjax.models import llama  # noqa: E402
from spanjax.models import speculator as S  # noqa: E402
from spanjax.models.config import ModelConfig  # noqa: E402
from spanjax.models.loading import LoadedModel  # noqa: E402
from spanjax.models.sharding import make_mesh, mesh_spec_of, param_partition_specs, parse_mesh  # noqa: E402
from spanjax.training import mesh as M  # noqa: E402
from spanjax.training.checkpoint import Checkpointer  # noqa: E402
from spanjax.training.config import AdapterSection, DataSection, OptimSection, TrainConfig  # noqa: E402
from spanjax.training.core import Recipe, SimulatedCrash, read_metrics, train_loop  # noqa: E402
from spanjax.training.speculator import SpeculatorObjective, param_specs  # noqa: E402
from spanjax.training.trainer import train  # noqa: E402

# Head counts, MLP width and hidden size divide every mesh used (8 kv heads: model=8 works).
CFG = ModelConfig(
    vocab_size=64,
    hidden_size=32,
    intermediate_size=64,
    num_layers=2,
    num_heads=8,
    num_kv_heads=8,
    head_dim=4,
    eos_token_ids=(2,),
)
SINGLE = "data=1,model=1"


class ChatToy:
    """Character tokenizer with a ChatML-like template: [role]content<2>."""

    eos_token_ids = (2,)

    def encode(self, text, add_special_tokens=False):
        return [5 + ord(c) % 50 for c in text]

    def decode(self, ids, skip_special_tokens=True):
        return "".join(chr(i) for i in ids)

    def encode_message(self, role, content):
        return [3] + self.encode(role) + [4] + self.encode(content) + [2]

    def generation_prefix_ids(self):
        return [3] + self.encode("assistant") + [4]


def model() -> LoadedModel:
    return LoadedModel("tiny", CFG, llama.init_params(CFG, jax.random.PRNGKey(0), scale=0.2), ChatToy())


def write_data(path: Path, n: int = 16) -> Path:
    rows = []
    for i in range(n):
        yes = i % 2 == 0
        user = ("abc" if yes else "xyz") * (1 + i % 3) + "q" * (i % 4)
        rows.append({"messages": [{"role": "user", "content": user}, {"role": "assistant", "content": "yn"[i % 2]}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def adapter_cfg(out: Path, name: str, mesh: str, steps: int = 4) -> TrainConfig:
    data = out / "data.jsonl"
    if not data.exists():
        write_data(data)
    return TrainConfig(
        name=name,
        model="tiny",
        out_dir=str(out / "runs"),
        steps=steps,
        batch_size=8,
        checkpoint_every=2,
        mesh=mesh,
        adapter=AdapterSection(kind="alora", r=2, alpha=4.0, dropout=0.1, target_modules=("q_proj", "v_proj")),
        data=DataSection(source=str(data), invocation="go", max_prefix_tokens=24, max_suffix_tokens=24),
        optim=OptimSection(lr=1e-2, warmup_steps=1),
    )


def curve(run_dir) -> list[dict]:
    return [{k: m[k] for k in ("step", "loss", "grad_norm", "lr")} for m in read_metrics(run_dir)]


def adapter_weights(run_dir) -> dict:
    """The exported adapter's weights, as lists (for JSON)."""
    w = load_peft(f"{run_dir}/adapter", CFG).weights
    return {str(k): np.asarray(v).tolist() for k, v in jax.tree_util.tree_leaves_with_path(w)}


def adapter_run(out: Path, name: str, mesh: str, crash_after: int | None = None) -> dict:
    cfg = adapter_cfg(out, name, mesh)
    try:
        summary = train(cfg, model=model(), crash_after_step=crash_after)
    except SimulatedCrash:
        return {"crashed": True, "curve": curve(Path(cfg.out_dir) / name)}
    run_dir = summary["run_dir"]
    return {"resumed_from": summary["resumed_from"], "curve": curve(run_dir), "weights": adapter_weights(run_dir)}


# ---------------------------------------------------------------------------- the speculator recipe


@dataclasses.dataclass(frozen=True)
class SpecCfg:
    steps: int = 2
    checkpoint_every: int = 2
    log_every: int = 1
    seed: int = 0
    mesh: str = SINGLE
    optim: OptimSection = OptimSection(lr=1e-2, warmup_steps=1)


def speculator_run(out: Path, mesh: str) -> dict:
    spec_cfg = S.SpeculatorConfig(emb_dim=32, vocab_size=64, inner_dim=16, n_predict=2)
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(16, 6, 32)).astype(np.float32)
    tokens = rng.integers(0, 64, (16, 6 + 2)).astype(np.int32)
    mask = np.ones((16, 6 + 2), np.float32)

    def batch(step):
        idx = np.arange(8) + 8 * (step % 2)
        return hidden[idx], tokens[idx], mask[idx]

    recipe = Recipe(
        "speculator",
        S.init_speculator(spec_cfg, jax.random.PRNGKey(1)),
        SpeculatorObjective(spec_cfg),
        None,
        batch,
        log=lambda step, m: {"loss": float(m["loss"]), "grad_norm": float(m["grad_norm"]), "lr": float(m["lr"])},
        param_specs=lambda mesh: param_specs(spec_cfg, mesh),
    )
    run_dir = out / f"speculator_{mesh.replace(',', '_').replace('=', '')}"
    run_dir.mkdir(parents=True)
    res = train_loop(SpecCfg(mesh=mesh), run_dir, recipe)
    emb = res.state.params.emb
    mu_emb = res.state.opt_state[1][0].mu.emb  # AdamW's first moment follows the parameter's sharding
    return {
        "curve": curve(run_dir),
        "params": {k: np.asarray(v).tolist() for k, v in vars(M.to_host(res.state.params)).items()},
        "emb_spec": str(getattr(emb.sharding, "spec", None)),
        "mu_emb_spec": str(getattr(mu_emb.sharding, "spec", None)),
    }


# ---------------------------------------------------------------------------- scenarios


ADAPTER_MESHES = (SINGLE, "data=2,model=4", "data=8,model=1")


def on_meshes(out: Path) -> dict:
    adapter = {mesh: adapter_run(out, f"alora_{i}", mesh) for i, mesh in enumerate(ADAPTER_MESHES)}
    speculator = {mesh: speculator_run(out, mesh) for mesh in (SINGLE, "data=2,model=4")}
    killed = adapter_run(out, "moved", "data=2,model=4", crash_after=3)  # checkpoint at 2; step 3 is replayed
    resumed = adapter_run(out, "moved", "data=1,model=8")

    # Checkpointer.restore onto abstract targets with shardings, saved on one mesh, read on another.
    a, b = make_mesh(parse_mesh("data=2,model=4")), make_mesh(parse_mesh("data=1,model=8"))
    x = np.arange(64 * 8, dtype=np.float32).reshape(64, 8)
    saved = {"w": M.place(x, M.named(a, P("data", "model"))), "n": M.place(np.int32(7), M.named(a, None))}
    ckpt = Checkpointer(out / "direct", 1)
    ckpt.save(1, saved, force=True)
    ckpt.close()
    targets = {
        "w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=M.named(b, P(None, "model"))),
        "n": jax.ShapeDtypeStruct((), np.int32, sharding=M.named(b, None)),
    }
    ckpt = Checkpointer(out / "direct", 1)
    got = ckpt.restore(1, targets)
    ckpt.close()
    direct = {
        "equal": bool(np.array_equal(np.asarray(got["w"]), x)) and int(got["n"]) == 7,
        "spec": str(got["w"].sharding.spec),
        "mesh_shape": dict(got["w"].sharding.mesh.shape),
    }
    return {"adapter": adapter, "speculator": speculator, "killed": killed, "resumed": resumed, "direct": direct}


# ---------------------------------------------------------------------------- multi-host


def check_train(out: Path, mesh) -> dict:
    """Two aLoRA steps on the global mesh through the whole trainer (checkpoints, metrics, export)."""
    cfg = adapter_cfg(out, "mh", str(mesh_spec_of(mesh)), steps=2)
    summary = train(cfg, model=model())
    if not distributed.is_main_process():
        return {}
    return {"curve": curve(summary["run_dir"]), "weights": adapter_weights(summary["run_dir"])}


def check_forward(out: Path, mesh) -> dict:
    """The model's logits with its weights sharded over the global mesh (inference rules)."""
    m = model()
    params = M.place(m.params, M.named(mesh, param_partition_specs(CFG, m.params, "inference", mesh)))
    tokens = np.random.default_rng(3).integers(5, 60, (2, 12)).astype(np.int32)
    positions = np.broadcast_to(np.arange(12, dtype=np.int32), (2, 12))
    fwd = jax.jit(
        lambda p, t, pos: llama.compute_logits(
            p, CFG, llama.forward_dense(p, CFG, t, pos, llama.init_dense_cache(CFG, 2, 12))[0]
        ),
        out_shardings=M.named(mesh, None),
    )
    batch = M.batch_sharding(mesh)
    logits = fwd(params, M.place(tokens, batch), M.place(positions, batch))
    return {"logits": np.asarray(logits).tolist()} if distributed.is_main_process() else {}


def check_engine(out: Path, mesh) -> dict:
    """One Engine on the global (1, 8) mesh (its model axis spans both processes; (2, 4) would be
    replicas, which are per process): two span queries submitted at once (a cross holding a plus
    of documents, parallel positions; a cross with nested plus nodes, one sampling with
    temperature), prefill then 4 decode steps each; every process runs the same steps."""
    from spanjax.engine.engine import Engine, EngineConfig
    from spanjax.engine.sampling import SamplingParams
    from spanjax.query import ast as A
    from spanjax.query.lower import lower

    m = model()
    config = EngineConfig(
        num_pages=64, page_size=4, max_tokens_per_step=32, max_seqs_per_step=4, compilation_cache="off", mesh="model=8"
    )
    engine = Engine(m, config)
    runner = engine.runner  # one bucket per axis: two compiled steps (mixed, decode-only), not one per shape
    runner.token_buckets, runner.seq_buckets, runner.page_buckets = [32], [4], [32]
    docs = tuple(A.user(text) for text in ("alpha beta gamma", "delta epsilon", "zeta eta theta iota"))
    queries = [
        A.G("tiny", A.Cross((A.system("read"), A.Plus(docs), A.user("which one?"))), positions="parallel"),
        A.G(
            "tiny",
            A.Cross((A.system("sys"), A.Plus((A.user("a b"), A.Cross((A.user("c"), A.Plus(docs[:2]))))), A.user("q"))),
        ),
    ]
    samplings = [
        SamplingParams(max_tokens=5, ignore_eos=True),
        SamplingParams(max_tokens=5, ignore_eos=True, temperature=0.8, top_k=20, seed=1),
    ]
    reqs = [
        engine.submit(lower(g, m.tokenizer, model="tiny", page_size=config.page_size), s, keep_logits=True)
        for g, s in zip(queries, samplings)
    ]
    engine.run_until_done(reqs)
    if not distributed.is_main_process():
        return {}
    refused = {}
    if jax.process_count() > 1:  # replicas are per process; experiment runs are one process
        from spanjax.config import ConfigError
        from spanjax.engine.replicas import EngineReplicas
        from spanjax.eval.experiments import check_placement
        from spanjax.eval.locality import LocalityConfig

        for name, refuse in (
            ("replicas", lambda: EngineReplicas(m, dataclasses.replace(config, mesh="data=2,model=4"))),
            ("experiment", lambda: check_placement(LocalityConfig())),
        ):
            try:
                refuse()
            except (ValueError, ConfigError) as e:
                refused[name] = str(e)
    return {
        "refused": refused,
        "tokens": [r.generated for r in reqs],
        "logits": [np.stack(r.logits).tolist() for r in reqs],
        "steps": engine.steps,
        "processes": sorted({d.process_index for d in engine.mesh.devices.flat}),
        "pool_shard": list(engine.cache.k.sharding.shard_shape(engine.cache.k.shape)),
    }


CHECKS = {"train": check_train, "forward": check_forward, "engine": check_engine}


def multihost(out: Path) -> dict:
    mesh = make_mesh(parse_mesh("data=2,model=4"))  # over the global jax.devices()
    result = {"process_count": jax.process_count(), "device_count": jax.device_count()}
    for name, check in CHECKS.items():
        result[name] = check(out, mesh)
    return result


SCENARIOS = {"mesh": on_meshes, "multihost": multihost}

if __name__ == "__main__":
    scenario, out = sys.argv[1], Path(sys.argv[2])
    out.mkdir(parents=True, exist_ok=True)
    result = SCENARIOS[scenario](out)
    if distributed.is_main_process():
        (out / "result.json").write_text(json.dumps(result))
