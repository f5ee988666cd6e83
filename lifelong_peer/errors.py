"""Errors a user can fix. The command line prints them as one sentence and exits with code 2."""


class UserError(Exception):
    """Bad input, bad arguments, a missing or busy workspace: the message says what and where."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, not ours, corrupted, or inconsistent with its config."""
