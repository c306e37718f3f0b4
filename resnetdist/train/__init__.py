"""The training core: one rank's run (run.py), the step (step.py), the loop (loop.py), resume
state, the lr schedule, the optimizer, evaluation, metrics, preemption and the run directory."""
