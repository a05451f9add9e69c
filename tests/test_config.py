"""spanjax/config.py and the presets in configs/: every YAML loads, overrides
apply with the right types, and bad keys / values fail naming the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

import pytest
import yaml

from spanjax import config as C
from spanjax.cli.main import EVAL_PRESETS, main
from spanjax.eval.experiments import TASKS, load_config

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
CONFIGS = sorted(CONFIG_DIR.glob("*.yaml"))
NQ = CONFIG_DIR / "locality_nq.yaml"


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    mode: Literal["a", "b"] = "a"
    sizes: tuple[int, ...] = (1, 2)
    limit: int | None = None


@dataclasses.dataclass(frozen=True)
class Outer:
    name: str = "x"
    flag: bool = False
    inner: Inner = Inner()


def test_library_types_and_overrides():
    cfg = C.from_dict(Outer, {"inner": {"rate": 1}})
    assert cfg.inner.rate == 1.0 and isinstance(cfg.inner.rate, float)  # int accepted for float
    cfg = C.override(cfg, ["inner.sizes=[3, 4]", "inner.limit=7", "flag=true", "name=y", "inner.mode=b"])
    assert cfg == Outer("y", True, Inner(1.0, "b", (3, 4), 7))
    assert C.override(cfg, ["inner.limit=null"]).inner.limit is None
    assert C.from_dict(Outer, yaml.safe_load(C.dump(cfg))) == cfg
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.name = "z"


@pytest.mark.parametrize(
    "override, message",
    [
        ("inner.rate=fast", "inner.rate: expected float, got 'fast'"),
        ("inner.mode=c", "inner.mode: expected 'a' | 'b', got 'c'"),
        ("flag=1", "flag: expected bool, got 1"),
        ("inner.sizes=[1, x]", "inner.sizes[1]: expected int, got 'x'"),
        ("inner.nope=1", "unknown key 'inner.nope'"),
        ("nope=1", "unknown key 'nope'"),
        ("inner=3", "inner: expected Inner"),
        ("name.sub=1", "'name' is a value, not a section"),
        ("noequals", "bad override 'noequals'"),
        ("a..b=1", "bad override"),
    ],
)
def test_library_errors_name_the_key(override, message):
    with pytest.raises(C.ConfigError, match=__import__("re").escape(message)):
        C.override(Outer(), [override])


def _is_training_preset(path: Path) -> bool:
    """Training presets (`spanjax train ...`) have an `adapter` section and no `task`."""
    data = yaml.safe_load(path.read_text())
    return "task" not in data and "adapter" in data


def _is_speculator_preset(path: Path) -> bool:
    """Speculator presets (`spanjax train speculator ...`) have a `speculator` section and no `task`."""
    data = yaml.safe_load(path.read_text())
    return "task" not in data and "speculator" in data


SPECULATOR_CONFIGS = [p for p in CONFIGS if _is_speculator_preset(p)]
EXPERIMENT_CONFIGS = [p for p in CONFIGS if not _is_training_preset(p) and not _is_speculator_preset(p)]
TRAINING_CONFIGS = [p for p in CONFIGS if _is_training_preset(p)]


@pytest.mark.parametrize("path", TRAINING_CONFIGS, ids=lambda p: p.name)
def test_every_training_preset_loads_round_trips_and_overrides(path, tmp_path):
    from spanjax.training.config import TrainConfig

    cfg = C.load(TrainConfig, path)
    dumped = tmp_path / "c.yaml"
    dumped.write_text(C.dump(cfg))
    assert C.load(TrainConfig, dumped) == cfg
    o = C.load(TrainConfig, path, ["steps=7", "adapter.r=4", "optim.lr=0.001", "name=renamed"])
    assert (o.steps, o.adapter.r, o.optim.lr, o.name) == (7, 4, 0.001, "renamed")
    for bad, msg in [("steps=abc", "steps: expected int"), ("adapter.unknown=1", "unknown key 'adapter.unknown'")]:
        with pytest.raises(C.ConfigError, match=msg):
            C.load(TrainConfig, path, [bad])


@pytest.mark.parametrize("path", SPECULATOR_CONFIGS, ids=lambda p: p.name)
def test_every_speculator_preset_loads_round_trips_and_overrides(path, tmp_path):
    from spanjax.training.speculator_config import SpeculatorTrainConfig

    cfg = C.load(SpeculatorTrainConfig, path)
    dumped = tmp_path / "c.yaml"
    dumped.write_text(C.dump(cfg))
    assert C.load(SpeculatorTrainConfig, dumped) == cfg
    o = C.load(
        SpeculatorTrainConfig, path, ["stage2_steps=7", "speculator.inner_dim=64", "optim.lr=0.001", "name=renamed"]
    )
    assert (o.stage2_steps, o.speculator.inner_dim, o.optim.lr, o.name) == (7, 64, 0.001, "renamed")
    for bad, msg in [
        ("stage1_steps=abc", "stage1_steps: expected int"),
        ("speculator.unknown=1", "unknown key 'speculator.unknown'"),
    ]:
        with pytest.raises(C.ConfigError, match=msg):
            C.load(SpeculatorTrainConfig, path, [bad])
    with pytest.raises(ValueError, match="DEV questions only"):  # the held-out questions 2000.. are never trained on
        C.load(SpeculatorTrainConfig, path, ["data.stage2_prompts=2001"])


@pytest.mark.parametrize("path", EXPERIMENT_CONFIGS, ids=lambda p: p.name)
def test_every_preset_loads_round_trips_and_overrides(path, tmp_path):
    cfg = load_config(path)
    assert cfg.task in TASKS and dataclasses.is_dataclass(cfg)
    # The dumped config (what a run dir stores) loads back to the same value.
    dumped = tmp_path / "c.yaml"
    dumped.write_text(C.dump(cfg))
    assert load_config(dumped) == cfg
    # Valid overrides apply with the right types.
    o = load_config(path, ["seed=7", "model=other", "engine.page_size=8", "name=renamed"])
    assert (o.seed, o.model, o.engine.page_size, o.name) == (7, "other", 8, "renamed")
    assert isinstance(o.seed, int)
    for bad, msg in [
        ("seed=abc", "seed: expected int"),
        ("eval.unknown=1", "unknown key 'eval.unknown'"),
        ("engine.page_size=1.5", "engine.page_size: expected int"),
        ("task=nope", "unknown task 'nope'"),
    ]:
        with pytest.raises(C.ConfigError, match=msg):
            load_config(path, [bad])


def test_task_specific_overrides():
    cfg = load_config(NQ, ["eval.num_docs=5", "eval.positions=[0, 4]", "eval.variants=[stock]", "eval.split=dev"])
    assert (cfg.eval.num_docs, cfg.eval.positions, cfg.eval.variants, cfg.eval.split) == (5, (0, 4), ("stock",), "dev")
    assert cfg.eval.gold_positions == (0, 4)
    with pytest.raises(C.ConfigError, match="positions must lie in 0..4"):
        load_config(NQ, ["eval.num_docs=5", "eval.positions=[5]"])
    with pytest.raises(C.ConfigError, match="variants: unknown"):
        load_config(NQ, ["eval.variants=[bogus]"])
    with pytest.raises(C.ConfigError, match="eval.split: expected 'dev' | 'held_out'"):
        load_config(NQ, ["eval.split=test"])
    with pytest.raises(C.ConfigError, match="max_tokens_per_step must be >= 16"):
        load_config(NQ, ["engine.max_tokens_per_step=8"])
    n = load_config(CONFIG_DIR / "ttft_nested.yaml", ["eval.fan_in=[1, 2]"])
    assert n.eval.fan_in == (1, 2)
    r = load_config(CONFIG_DIR / "ttft_rag.yaml", ["eval.docs=[2, 8]"])
    assert r.eval.docs == (2, 8)
    with pytest.raises(C.ConfigError, match="docs"):
        load_config(CONFIG_DIR / "ttft_rag.yaml", ["eval.docs=[]"])


def test_missing_file_and_task(tmp_path):
    with pytest.raises(C.ConfigError, match="not found"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "t.yaml"
    p.write_text("name: x\n")
    with pytest.raises(C.ConfigError, match="missing required key 'task'"):
        load_config(p)


def test_cli_print_config_and_one_line_errors(capsys):
    assert main(["run", str(NQ), "eval.num_docs=4", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "num_docs: 4" in out and "task: locality" in out
    assert main(["run", str(NQ), "eval.num_docs=four"]) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "eval.num_docs: expected int, got 'four'" in err
    assert main(["eval", "locality", "eval.num_questions=3", "--print-config"]) == 0
    assert "num_questions: 3" in capsys.readouterr().out
    assert set(EVAL_PRESETS.values()) <= {p.name for p in CONFIGS}


def test_engine_presets_load_as_engine_configs():
    from spanjax.engine.engine import EngineConfig

    presets = sorted((CONFIG_DIR / "engine").glob("*.yaml"))
    assert presets
    for path in presets:
        assert isinstance(C.load(EngineConfig, path), EngineConfig)
    assert C.load(EngineConfig, CONFIG_DIR / "engine" / "cpu_decode.yaml").int8_activations
