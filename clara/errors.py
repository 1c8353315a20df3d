"""The base of the library's bad-input errors that are not ValueErrors.

Most of clara's own errors (CheckpointError, ConfigError, ValidationError, ...) are ValueErrors.
Those that are RuntimeErrors by nature (weights that will not load, a generator that answers
nothing) also derive from InputError, so a command line can tell all of them from a bug.
"""


class InputError(Exception):
    """Bad input a user can fix; the message names the file, line or field."""
