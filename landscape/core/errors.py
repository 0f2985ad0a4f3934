"""User-facing errors.

Anything the user can fix (a bad flag, a missing file, a malformed row) raises a subclass of
:class:`LandscapeError`. The CLI prints its message on one line and exits with status 2; library callers
can catch it like a ``ValueError``.
"""


class LandscapeError(ValueError):
    """A problem with the user's input; the message names the bad value and what is expected."""


class DataError(LandscapeError):
    """A task's data files are missing or malformed."""


class ConfigError(LandscapeError):
    """A configuration value is out of range, of the wrong type, or unknown."""


class CheckpointError(LandscapeError):
    """A checkpoint is missing, not safetensors, or does not fit the model."""
