"""Errors that the entry point turns into a message and a non-zero exit."""


class TrainerError(Exception):
  """Base class of the errors that are the user's to fix (bad input)."""


class ConfigError(TrainerError):
  """A config field has a value that is not allowed."""


class DataError(TrainerError):
  """The requested data cannot be loaded."""


class WorkdirError(TrainerError):
  """The workdir cannot be used."""


class CheckpointError(TrainerError):
  """A checkpoint cannot be restored into the current run."""


class NonFiniteError(TrainerError):
  """Training produced a NaN or infinite loss, gradient norm or state."""


class SurgeryError(TrainerError):
  """A hook failed or left a state that does not fit the run."""
