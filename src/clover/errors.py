"""Exceptions for user mistakes: the CLI prints their message on one line and exits with code 2."""


class CloverError(Exception):
    """A problem the user can fix; the message says how."""


class UnsupportedModelError(CloverError):
    """The model's family has no adapter."""


class MissingModelPackageError(CloverError):
    """A named real model's pip package is not installed."""


class CloverWarning(UserWarning):
    """Something clover worked around (a cache it could not read or write); the CLI prints it as one note."""
