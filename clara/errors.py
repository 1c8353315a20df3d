"""The base of the library's bad-input errors that are not ValueErrors, and the errors that
modules on two levels raise.

Most of clara's own errors (CheckpointError, ConfigError, ValidationError, ...) are ValueErrors.
Those that are RuntimeErrors by nature (weights that will not load, a generator that answers
nothing) also derive from InputError, so a command line can tell all of them from a bug.
CheckpointError lives here because both clara.checkpoint and the official-checkpoint reader below
it (clara.official_format) raise it.
"""


class InputError(Exception):
    """Bad input a user can fix; the message names the file, line or field."""


class CheckpointError(ValueError):
    """A checkpoint (a Clara model folder, or a training run's step checkpoint) that cannot be used;
    the message names the file and what is wrong. The one error class of every checkpoint reader
    (import it from clara.checkpoint)."""
