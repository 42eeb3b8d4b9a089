"""Training entry points (``torchrun``-ready), installed as ``streamkd.train``."""
