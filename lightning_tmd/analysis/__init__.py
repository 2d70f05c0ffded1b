"""Cost models for planning runs, not used by training."""
