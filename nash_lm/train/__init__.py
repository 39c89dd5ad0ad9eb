"""Training: the algorithm registry, the compiled steps, and the pipeline that runs stages of them.

Reading order for one Nash-MD-PG step (three files): `step.py` (`policy_step`: what runs in which order) ->
`algorithms/nash_md_pg.py` (how y and y' are drawn, the loss) -> `losses/common.py` (the reward-to-go
surrogate); the sampler (`nash_lm.sampling`), the judge and the model (`scoring.py`, `nash_lm.models`) are called
from there.

Around the step, one file per responsibility: `config.py` (the stage schema) -> `spec.py` (a config resolved once
into validated stage specs) -> `pipeline.py` (the runner every job uses) -> `stage.py` (one stage: resume, the
step loop, export) with `inputs.py` (what a stage starts from), `compile.py` (its state layout and compiled step)
and `evaluate.py`; `state.py`, `checkpoint.py` and `metrics.py` serve them.
"""
