"""Backbones: `create_model(name, **overrides)` builds any registered model."""
from effvit.models.registry import create_model, list_models

__all__ = ["create_model", "list_models"]
