"""Typed config of an adapter training run (YAML preset + dotted overrides via spanjax.config)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from spanjax.adapters import AdapterConfig
from spanjax.models.sharding import parse_mesh

SINGLE_DEVICE = "data=1,model=1"


def normalize_mesh(cfg) -> None:
    """Check a frozen config's `mesh` setting ("data=2,model=4", "model=8") and store it in full
    ("data=1,model=8"); a bad one raises ValueError (a ConfigError naming the config at load)."""
    object.__setattr__(cfg, "mesh", str(parse_mesh(cfg.mesh)))


@dataclasses.dataclass(frozen=True)
class AdapterSection:
    kind: Literal["alora", "lora"] = "alora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")

    def build(self, invocation_ids) -> AdapterConfig:
        """The adapter's config; `invocation_ids` is an aLoRA's invocation sequence (unused by a LoRA)."""
        return AdapterConfig(
            kind=self.kind,
            r=self.r,
            alpha=self.alpha,
            dropout=self.dropout,
            target_modules=self.target_modules,
            invocation_tokens=tuple(invocation_ids) if self.kind == "alora" else None,
        )


@dataclasses.dataclass(frozen=True)
class DataSection:
    # JSONL of {"messages": [{"role", "content"}, ..., {"role": "assistant", "content": target}]};
    # "answerability" builds it from nq-open-oracle (training/answerability.py) into the run dir;
    # "nq_blocks" builds block-attention examples (training/block_adapter.py, `spanjax train block-adapter`).
    source: str = "answerability"
    # The invocation, inserted as a message before the final assistant turn; its
    # tokens (encode_message(role, text)) are the aLoRA's invocation sequence.
    invocation_role: Literal["user", "system", "assistant"] = "user"
    invocation: str = "Answerability: can the question be answered from the documents?"
    max_prefix_tokens: int = 256  # before the invocation (longer prompts are cut from the left)
    max_suffix_tokens: int = 32  # invocation + assistant turn
    # answerability builder
    num_docs: int = 3
    max_doc_words: int = 40
    num_train_questions: int = 2000  # questions 0..N-1 (DEV split)
    # block-attention adapter (source "nq_blocks", training/block_adapter.py): the locality task's
    # examples (num_docs documents, gold at a random position) lowered as a span query; the
    # invocation message's opening tokens (e.g. "Question:") are the aLoRA invocation.
    max_doc_tokens: int = 0  # cut each document to this many tokens (0 = whole), as eval.max_doc_tokens
    max_answer_tokens: int = 32  # assistant answer + end of turn; longer answers are dropped
    position_policies: tuple[Literal["sequential", "parallel"], ...] = ("sequential", "parallel")  # sampled per example
    page_size: int = 16  # the span planner's page size (as the engine's)


@dataclasses.dataclass(frozen=True)
class OptimSection:
    lr: float = 2e-4
    warmup_steps: int = 10
    end_lr_fraction: float = 0.1  # cosine decays to lr * this at the last step
    weight_decay: float = 0.01
    clip_norm: float = 1.0
    b1: float = 0.9
    b2: float = 0.999


@dataclasses.dataclass(frozen=True)
class EvalSection:
    num_questions: int = 0  # held-out questions 2000.. to score after training (0 = skip)
    batch_size: int = 8


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str = "alora"
    model: str = "smollm2-135m"
    seed: int = 0
    out_dir: str = "runs"
    steps: int = 100
    batch_size: int = 4
    checkpoint_every: int = 25
    log_every: int = 1
    # Devices to train on: "data=D,model=M" over jax.devices() (docs/scaling.md, "Training on a mesh");
    # the default is one device. Not part of the run's identity: a run resumes on any mesh.
    mesh: str = SINGLE_DEVICE
    adapter: AdapterSection = AdapterSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    eval: EvalSection = EvalSection()

    def __post_init__(self):
        for f in ("steps", "batch_size", "checkpoint_every", "log_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        normalize_mesh(self)
