"""effvit: efficient attention in hierarchical vision backbones, in JAX/Flax."""
__version__ = "0.1.0"
