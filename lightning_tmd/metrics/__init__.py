"""Metrics: the shapes judge, Fréchet video distance on its features, prompt adherence, temporal
consistency, and (with user-supplied weights) CLIP score and LPIPS diversity."""
