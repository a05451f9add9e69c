"""Training recipes on one core (core.py: state, jitted update, checkpoints, exact resume, metrics;
on a device mesh, mesh.py):
LoRA / aLoRA adapters (trainer.py) with conversation data (data.py) or block-attention data
(block_adapter.py), MLP speculators (speculator.py); the answerability intrinsic (answerability.py)."""
