"""Ignite handlers, one concern per module: checkpoints and model info, metrics, model selection, panels, tracking,
stage-1 validation."""
