"""The training core: what each worker process does (worker.py), the Trainer that owns a run
(trainer.py), the step (step.py), the loop's parts (loop.py), the lr schedule, the optimizer,
evaluation, metrics, preemption and the run directory's lock."""
