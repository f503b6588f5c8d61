"""Errors a user can fix. The CLI prints these as one clear message, without a traceback."""


class SublabError(Exception):
    """Base class: something the user must fix (bad input, missing file, missing package)."""


class ConfigError(SublabError):
    """The experiment file or an option is invalid."""


class ModelError(SublabError):
    """A model reference cannot be resolved, loaded or converted."""


class RunDirError(SublabError):
    """A run directory is missing files, holds malformed rows, or belongs to another config."""


class DataError(SublabError):
    """A dataset file is missing, empty or malformed."""
