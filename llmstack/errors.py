"""Errors that the command line turns into one clear message and exit status 2.

Anything a user can cause (a bad config key, a missing file, impossible batch arithmetic, a
tokenizer that does not match a checkpoint) raises `UsageError`; the CLI prints its message
without a traceback. Bugs stay ordinary exceptions so they keep their traceback.
"""


class UsageError(Exception):
    """A user-facing error: printed as one message, exit status 2."""


class ConfigError(UsageError):
    """A config file or override that does not fit the schema."""


class RankError(UsageError):
    """A user-facing error met by some ranks only (rank 0's failure that the others learn of, a
    tokenizer one host cannot see): each rank that meets it prints it and exits 2 at once, since
    its peers may be waiting for it (the launcher then stops them)."""

    every_rank = True


class TrainingStopped(Exception):
    """A training run that ended early on purpose, every rank at the same step; the CLI prints the
    message (no traceback) and exits with `exit_code`."""

    exit_code = 1


class Diverged(TrainingStopped):
    """The loss or gradient norm stayed non-finite (train.max_skipped_steps), or the weights did:
    exit status 3, no checkpoint of the bad state written."""

    exit_code = 3


class Preempted(TrainingStopped):
    """SIGTERM or SIGUSR1 asked the run to stop: it finished its step and saved a checkpoint.
    Exit status 75 (EX_TEMPFAIL: run the same command again to continue); launch/slurm.sbatch
    requeues the job on it."""

    exit_code = 75
