"""`dkto train` whose KTO loss is NaN at the micro-steps listed in $DKTO_NAN_MICRO_STEPS (comma-separated, counted
from 0 in every process), for launching under `accelerate launch` (tests/test_multiprocess.py)."""
import os
import sys

from diffusion_kto import losses
from diffusion_kto.cli import main


def nan_at(micro_steps):
    """Patch losses.kto_loss so that its per-sample losses are NaN on the given calls (one call per micro-step)."""
    real, calls = losses.kto_loss, [0]

    def kto_loss(*a, **k):
        out = real(*a, **k)
        calls[0] += 1
        return out._replace(losses=out.losses * float("nan")) if calls[0] - 1 in micro_steps else out

    losses.kto_loss = kto_loss
    return real


if __name__ == "__main__":
    nan_at({int(s) for s in os.environ["DKTO_NAN_MICRO_STEPS"].split(",")})
    sys.exit(main(["train", *sys.argv[1:]]))
