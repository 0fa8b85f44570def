"""Ray Train driver and the one per-worker loop (DeepSpeed, checkpoints, MLflow)."""
