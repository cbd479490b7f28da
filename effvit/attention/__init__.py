"""The attention mechanisms of effvit; each file opens with its equations."""
