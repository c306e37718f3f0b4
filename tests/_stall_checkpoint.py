"""The real `resnetdist` command with a fault injected from the test side: rank 0 freezes (SIGSTOP
to itself, every thread with it: a node frozen on a dead network disk) as its checkpoint write
at iteration AT starts; the other ranks wait for it in the checkpoint barrier. Other ranks and
other iterations run the command as is.

usage: python tests/_stall_checkpoint.py AT train ARGS...   (as torchrun's script)
"""

import os
import signal
import sys

from resnetdist import cli
from resnetdist.rundir import Checkpoints


def main() -> None:
    at, args = int(sys.argv[1]), sys.argv[2:]
    if os.environ.get("RANK", "0") == "0":
        save = Checkpoints.save

        def save_stalling_at(self, iteration, *rest, **kw):
            if iteration == at:
                os.kill(os.getpid(), signal.SIGSTOP)
            return save(self, iteration, *rest, **kw)

        Checkpoints.save = save_stalling_at
    sys.argv = ["resnetdist", *args]
    cli.main()


if __name__ == "__main__":
    main()
