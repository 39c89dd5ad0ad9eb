"""nash-lm: Nash learning from human feedback in JAX/Flax.

Sub-packages: `games` (exact tabular preference games, the ground truth every other part is measured
against).
"""
__version__ = "0.1.0"
