"""nash-lm: Nash learning from human feedback in JAX/Flax.

Sub-packages: `games` (exact tabular preference games, the ground truth), `learning` (learning the game from
labelled pairs), `models`, `sampling`, `parallel` (the sharded transformer and its geometric-mixture sampler),
`train` (one compiled step per algorithm, checkpoints, the stage loop), `data`, `tasks`, `evaluation`,
`interop`, `export`, `distributed`. `main` is the command-line entry point.
"""
__version__ = "0.1.0"
