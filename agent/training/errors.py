"""The training error tree, each error carrying the worker's error_class and retryability.

    TrainingError                      base; error_class "CRASHED", retryable
    ├── SpecError(ValueError)          "INVALID_SPEC", a field and its bad value are named
    ├── DatasetError(ValueError)       "DATASET_INVALID", the file and 1-based line are named
    ├── DoesNotFit                     "DOES_NOT_FIT", the estimate and the budget are named
    ├── Unsupported                    "UNSUPPORTED", e.g. an architecture without default targets
    │   └── Unsupported4Bit            4-bit requested, unavailable, and fallback refused
    └── IncompatibleBase               "INCOMPATIBLE_BASE", base or checkpoint do not match the job

Everything but the base class is non-retryable: retrying on the same device gives the same
answer. Torch-free, so the idle agent can import it.
"""

from __future__ import annotations

from protos.wire import ErrorClass


class TrainingError(Exception):
    """Base of every error a training job reports."""

    error_class = ErrorClass.CRASHED
    retryable = True


class SpecError(TrainingError, ValueError):
    """A TrainingSpec field has a bad value (the message names the field and the value)."""

    error_class = ErrorClass.INVALID_SPEC
    retryable = False


class DatasetError(TrainingError, ValueError):
    """The dataset file is malformed (the message names the file and the 1-based line)."""

    error_class = ErrorClass.DATASET_INVALID
    retryable = False


class DoesNotFit(TrainingError):
    """No memory plan fits the budget (the message gives the estimate and the budget)."""

    error_class = ErrorClass.DOES_NOT_FIT
    retryable = False


class Unsupported(TrainingError):
    """The device or the base model cannot run this job as specified."""

    error_class = ErrorClass.UNSUPPORTED
    retryable = False


class Unsupported4Bit(Unsupported):
    """4-bit quantization is unavailable here and the spec refuses the fp32 fallback."""


class IncompatibleBase(TrainingError):
    """The base model does not match the job (target modules missing, checkpoint for another base)."""

    error_class = ErrorClass.INCOMPATIBLE_BASE
    retryable = False


# Exit codes of `python -m agent.training.worker`, shared by the worker and the runner.
EXIT_DONE = 0
EXIT_CRASH = 1
EXIT_NON_RETRYABLE = 2
EXIT_PAUSED = 3
