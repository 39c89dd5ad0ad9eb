"""Training: the algorithm registry, the compiled steps, and the pipeline that runs stages of them.

Reading order for one Nash-MD-PG step: `algorithms.py` (its record: how y' is drawn, its loss) -> `step.py` (the
jitted function) -> `nash_lm.sampling` (y and y') -> `scoring.py` and `nash_lm.models` (preference head,
log-probs) -> `losses/nash_md_pg.py` (the estimator) -> back in `step.py` (optimizer and EMA update).

Around the step, one file per responsibility: `config.py` (the stage schema) -> `spec.py` (a config resolved once
into validated stage specs) -> `pipeline.py` (the runner every job uses) -> `stage.py` (one stage: resume, the
step loop, export) with `inputs.py` (what a stage starts from), `compile.py` (its state layout and compiled step)
and `evaluate.py`; `state.py`, `checkpoint.py` and `metrics.py` serve them.
"""
