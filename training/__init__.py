"""Training loops: LoRA / aLoRA adapters (trainer.py), data (data.py), checkpoints (checkpoint.py),
the answerability intrinsic (answerability.py)."""
