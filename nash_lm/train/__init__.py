"""Training: train state, the single compiled step per algorithm, losses, checkpoints, metrics and the stage loop.

Reading order for one Nash-MD-PG step: `step.py` (the jitted function) -> `nash_lm.sampling` (y and y') ->
`nash_lm.models` (preference head, log-probs) -> `losses/nash_md_pg.py` (the estimator) -> back in `step.py`
(optimizer and EMA update). `loop.py` runs stages; `checkpoint.py` and `metrics.py` serve it.
"""
