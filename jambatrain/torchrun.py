"""``python -m jambatrain.torchrun [torchrun args] -m jambatrain.train ...``: torchrun, with stop signals passed on.

Plain torchrun handles SIGTERM/SIGINT by raising inside its agent: it signals the trainers, SIGKILLs them 30 s
later whatever they are doing (a checkpoint included), and exits 1 with a traceback; SIGUSR1, which it does not
handle, kills the agent at once and leaves the trainers running unsupervised. Here the agent keeps SIGTERM, SIGUSR1
and SIGINT out of torchrun's handling (``--signals-to-handle`` / TORCHELASTIC_SIGNALS_TO_HANDLE) and passes each on to
the trainers, which checkpoint at the next step and exit 0 (jambatrain/train.py); the agent waits for them however
long the checkpoint takes and exits with their status: 0 after a clean stop. launch/torchrun.sh runs this; so does
the README's multi-process command.
"""
from __future__ import annotations

import os
import signal
import sys

PASSED_ON = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
TORCHRUN_HANDLES = "SIGHUP,SIGQUIT"


def _pass_on(signum, _frame) -> None:
    try:
        import psutil

        for p in psutil.Process().children():
            try:
                p.send_signal(signum)
            except psutil.NoSuchProcess:
                pass
    except Exception as exc:  # noqa: BLE001
        print(f"jambatrain: could not pass signal {signum} on to the trainers: {exc}", file=sys.stderr, flush=True)


def main() -> None:
    os.environ["TORCHELASTIC_SIGNALS_TO_HANDLE"] = os.environ["PET_SIGNALS_TO_HANDLE"] = TORCHRUN_HANDLES
    for sig in PASSED_ON:
        signal.signal(sig, _pass_on)
    sys.argv[0] = "torchrun"
    from torch.distributed.run import main as torchrun_main

    torchrun_main()


if __name__ == "__main__":
    main()
