"""Guards on optimizer steps: a non-finite loss or gradient skips the step (five in a row stop the run), and under
fp16 the gradient scaler's overflow skips are counted (30 in a row stop it). The counts go into checkpoints."""
from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)

MAX_BAD_STEPS = 5  # consecutive non-finite steps before the run is stopped
MAX_SCALER_BACKOFFS = 30  # fp16: consecutive scaler-skipped steps (scale / 2**30) before the run is stopped


@dataclass
class StepGuard:
    """Counts of skipped optimizer steps: in total (reported) and in a row (what stops a run)."""

    skipped: int = 0  # non-finite loss or gradient
    scaler_skipped: int = 0  # fp16: steps the gradient scaler skipped while lowering its scale (not errors)
    bad_in_a_row: int = 0
    overflow_in_a_row: int = 0

    def bad_step(self, step: int, why: str = "non-finite loss or gradient") -> None:
        """Count a skipped optimizer step (``why``: what was not finite); stop after too many in a row (last checkpoint
        intact)."""
        self.skipped += 1
        self.bad_in_a_row += 1
        log.warning("%s at step %d: step skipped, its whole accumulation window dropped (%d skipped so far)",
                    why, step, self.skipped)
        if self.bad_in_a_row >= MAX_BAD_STEPS:
            raise FloatingPointError(
                f"{self.bad_in_a_row} consecutive non-finite steps at step {step}; stopping. "
                "The last checkpoint is intact: lower optim.lr or loss.beta, or try train.mixed_precision=bf16/no"
            )

    def overflow_step(self, step: int, scale: float) -> None:
        """Count a step the fp16 scaler skipped; normal while it finds its scale, an error if it never does."""
        self.scaler_skipped += 1
        self.overflow_in_a_row += 1
        log.info("fp16 gradient scaler skipped step %d (overflow; scale now %g)", step, scale)
        if self.overflow_in_a_row >= MAX_SCALER_BACKOFFS:
            raise FloatingPointError(
                f"the fp16 gradient scaler skipped {self.overflow_in_a_row} steps in a row at step {step} "
                "(the gradients overflow at every scale); stopping. Try train.mixed_precision=bf16 or no"
            )

    def good_step(self) -> None:
        """An optimizer step was taken: the runs of bad and overflowed steps end."""
        self.bad_in_a_row = self.overflow_in_a_row = 0


def window_problem(bad: list[int], window: int) -> str | None:
    """What was not finite in an accumulation window of ``window`` micro-steps whose micro-steps ``bad`` (1-based) had a
    non-finite loss, e.g. "non-finite loss at micro-step 1 of 2"; None when every loss was finite."""
    if not bad:
        return None
    which = ", ".join(map(str, bad))
    return f"non-finite loss at micro-step{'s' if len(bad) > 1 else ''} {which} of {window}"
