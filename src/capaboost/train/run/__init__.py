"""One run, from its output folder to ``metrics.json``: set-up (:mod:`.session`), the loop (:mod:`.loop`),
evaluation (:mod:`.evaluation`), the results (:mod:`.results`) and the device settings (:mod:`.device`).
``train`` (:mod:`.runner`) ties them together."""

from ..run_folder.folder import RunExistsError, identity_diff
from .device import batch_to_device, enable_gradient_checkpointing, precision_problem, set_tf32, tf32_wanted
from .evaluation import predict
from .loop import FAIL_ENV, SimulatedInterruption, count_tokens, epoch_batches
from .runner import train

__all__ = [
    "FAIL_ENV", "RunExistsError", "SimulatedInterruption", "batch_to_device", "count_tokens",
    "enable_gradient_checkpointing", "epoch_batches", "identity_diff", "precision_problem", "predict",
    "set_tf32", "tf32_wanted", "train",
]
