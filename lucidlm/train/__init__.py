"""Training: data, the trainer, objectives (causal LM, DPO), checkpoints, distributed runs."""
