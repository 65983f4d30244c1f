"""Errors that the command line turns into one clear message and exit status 2.

Anything a user can cause (a bad config key, a missing file, impossible batch arithmetic, a
tokenizer that does not match a checkpoint) raises `UsageError`; the CLI prints its message
without a traceback. Bugs stay ordinary exceptions so they keep their traceback.
"""


class UsageError(Exception):
    """A user-facing error: printed as one message, exit status 2."""


class ConfigError(UsageError):
    """A config file or override that does not fit the schema."""
