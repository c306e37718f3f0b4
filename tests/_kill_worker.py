"""The real `resnetdist` command with a fault injected from the test side: on rank RANK's first
attempt (torchrun's TORCHELASTIC_RESTART_COUNT 0, or no torchrun at all) the process SIGKILLs
itself right after its step completes iteration AT, before anything else of that iteration
(drain, evaluation, checkpoint) runs. Other ranks and later attempts run the command as is.
conftest.run_cli / run_torchrun(kill_at=(AT, RANK)) start it.

usage: python tests/_kill_worker.py AT RANK train ARGS...   (or as torchrun's script)
"""

import os
import signal
import sys

from resnetdist import cli
from resnetdist.training import trainer


class KilledAfter:
    """The trainer's step, SIGKILLing its process once it has completed iteration `at`."""

    def __init__(self, step, at: int):
        self.step, self.at = step, at

    def __call__(self, *batch):
        self.step(*batch)
        if int(self.step.it) >= self.at:  # the step's own counter: iterations completed
            os.kill(os.getpid(), signal.SIGKILL)

    def __getattr__(self, name):
        return getattr(self.step, name)


def main() -> None:
    at, rank, args = int(sys.argv[1]), sys.argv[2], sys.argv[3:]
    if os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0" and os.environ.get("RANK", "0") == rank:
        fit = trainer.Trainer.fit

        def fit_killed_after(self, logger):
            self.step = KilledAfter(self.step, at)
            return fit(self, logger)

        trainer.Trainer.fit = fit_killed_after
    sys.argv = ["resnetdist", *args]
    cli.main()


if __name__ == "__main__":
    main()
