"""Errors a user can act on.

Every error raised for bad input derives from :class:`MTPRecipesError`; the CLI prints its message on
one line (what is wrong and how to fix it) instead of a traceback.
"""


class MTPRecipesError(Exception):
    """Base class for errors caused by user input (config, data, checkpoints)."""


class ConfigError(MTPRecipesError, ValueError):
    """A config value is unknown, of the wrong type or out of range."""


class CheckpointError(MTPRecipesError):
    """A checkpoint is missing, incomplete, or does not match the model."""


class DataError(MTPRecipesError, ValueError):
    """A data source or row cannot be used."""


class TrainingError(MTPRecipesError):
    """Training cannot go on (e.g. a non-finite loss); the last good checkpoint is kept."""


class ServerError(MTPRecipesError):
    """A generation server answered with an error, or not at all; what was already written is kept."""
