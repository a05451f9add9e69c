"""Typed config of a speculator training run (`spanjax train speculator CONFIG [KEY=VALUE ...]`).

A preset is recognised by its `speculator` section (and no `task`)."""

from __future__ import annotations

import dataclasses

from spanjax.training.config import SINGLE_DEVICE, OptimSection, normalize_mesh

DEV_QUESTIONS = 2000  # nq-open-oracle questions 0..1999; 2000..2654 are held out and never trained on


@dataclasses.dataclass(frozen=True)
class SpeculatorSection:
    n_predict: int = 3
    inner_dim: int = 256  # 0 = the base model's hidden size
    tie_weights: bool = False
    scale_input: bool = True
    # Train over the train_vocab - 1 most frequent target tokens of the training data plus one
    # shared "rare token" row/column, expanded to the full vocabulary at export (CPU budget: the
    # per-head vocab projection dominates a step). 0 = the full vocabulary.
    train_vocab: int = 0


@dataclasses.dataclass(frozen=True)
class SpeculatorDataSection:
    # Stage 1 text: "nq_passages" = the gold passages of DEV questions 0..stage1_examples-1
    # (Wikipedia, CC BY-SA), or a JSONL path of {"text": ...} lines.
    stage1_source: str = "nq_passages"
    stage1_examples: int = 512
    # Stage 2 prompts: "nq_questions" = chat prompts "<question>" for DEV questions
    # 0..stage2_prompts-1, or a JSONL path of {"messages": [...]} lines; the base model
    # generates the continuations (training data = its own outputs).
    stage2_source: str = "nq_questions"
    stage2_prompts: int = 512
    max_new_tokens: int = 96  # stage-2 continuation length
    temperature: float = 0.0  # stage-2 sampling (0 = greedy, what the benchmark decodes with)
    # More varied stage-2 data: the first `sampled_prompts` prompts get one more continuation each,
    # sampled at `sample_temperature` (generated after all the `temperature` ones).
    sampled_prompts: int = 0
    sample_temperature: float = 0.7
    # Validation: the last `val_prompts` stage-2 prompts (with all their continuations) are left
    # out of training; every `eval_every` steps the run logs each head's top-1 on them and the
    # tokens per verification forward that greedy speculative decoding of those continuations
    # would emit (exact for greedy data, up to float rounding), so epochs and sizes can be chosen
    # without looking at the held-out eval questions.
    val_prompts: int = 0
    gen_batch_size: int = 64
    seq_len: int = 128  # positions per training example (stage-1 text is cut to this)


@dataclasses.dataclass(frozen=True)
class SpeculatorTrainConfig:
    name: str = "speculator"
    model: str = "smollm2-135m"
    seed: int = 0
    out_dir: str = "runs"
    stage1_steps: int = 100  # teacher forcing on text
    stage2_steps: int = 300  # on the base model's own continuations
    batch_size: int = 8
    checkpoint_every: int = 50
    log_every: int = 1
    eval_every: int = 50  # validation cadence (data.val_prompts > 0), and always after the last step
    mesh: str = SINGLE_DEVICE  # "data=D,model=M" (docs/scaling.md, "Training on a mesh"); a run resumes on any mesh
    speculator: SpeculatorSection = SpeculatorSection()
    data: SpeculatorDataSection = SpeculatorDataSection()
    optim: OptimSection = OptimSection(lr=1e-3, warmup_steps=20, weight_decay=0.0)

    @property
    def steps(self) -> int:
        return self.stage1_steps + self.stage2_steps

    def __post_init__(self):
        for f in ("batch_size", "checkpoint_every", "log_every", "eval_every"):
            if getattr(self, f) < 1:
                raise ValueError(f"{f} must be >= 1, got {getattr(self, f)}")
        normalize_mesh(self)
        if self.stage1_steps < 0 or self.stage2_steps < 0 or self.steps < 1:
            raise ValueError("stage1_steps and stage2_steps must be >= 0 with at least one step")
        d = self.data
        if d.stage1_source == "nq_passages" and not 0 < d.stage1_examples <= DEV_QUESTIONS:
            raise ValueError(f"data.stage1_examples must lie in 1..{DEV_QUESTIONS} (DEV questions only)")
        if d.stage2_source == "nq_questions" and not 0 < d.stage2_prompts <= DEV_QUESTIONS:
            raise ValueError(f"data.stage2_prompts must lie in 1..{DEV_QUESTIONS} (DEV questions only)")
        if not 0 <= d.sampled_prompts <= d.stage2_prompts or d.sample_temperature <= 0:
            raise ValueError(
                "data.sampled_prompts must lie in 0..data.stage2_prompts and data.sample_temperature be > 0"
            )
        if d.val_prompts and not (self.stage2_steps and 0 < d.val_prompts < d.stage2_prompts):
            raise ValueError("data.val_prompts needs stage-2 steps and must lie in 0..data.stage2_prompts - 1")
        if d.seq_len < 2 or d.max_new_tokens < 1:
            raise ValueError("data.seq_len must be >= 2 and data.max_new_tokens >= 1")
