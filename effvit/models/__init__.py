"""Backbones: `create_model(name, **overrides)` builds any registered model."""
from effvit.models.registry import compute_dtype, create_model, list_models

__all__ = ["compute_dtype", "create_model", "list_models"]
