"""lightning-tmd: Transition Matching Distillation of flow-matching video models."""

__version__ = "0.1.0"
