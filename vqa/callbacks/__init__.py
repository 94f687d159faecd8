"""Lightning callbacks specific to this framework (checkpointing that resumes exactly,
preemption). Each is configured in ``configs/callbacks/``."""

from vqa.callbacks.preemption import Preempted, PreemptionCheckpoint
from vqa.callbacks.run_checkpoint import RunCheckpoint

__all__ = ["Preempted", "PreemptionCheckpoint", "RunCheckpoint"]
