"""Exceptions for user mistakes: the CLI prints their message on one line and exits with code 2."""


class CloverError(Exception):
    """A problem the user can fix; the message says how."""


class UnsupportedModelError(CloverError):
    """The model's family has no adapter."""


class MissingModelPackageError(CloverError):
    """A named real model's pip package is not installed."""


class NotStreamableError(CloverError):
    """A checkpoint the streaming path cannot read (not damaged: another format); ``reason`` says why as a phrase,
    for the note that loads it whole instead when streaming was chosen by size rather than asked for."""

    def __init__(self, message: str, reason: str):
        super().__init__(message)
        self.reason = reason


class CloverWarning(UserWarning):
    """Something clover worked around (a cache it could not read or write); the CLI prints it as one note."""
