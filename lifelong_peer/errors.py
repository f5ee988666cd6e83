"""Errors a user can fix. The command line prints them as one sentence and exits with code 2."""


class UserError(Exception):
    """Bad input, bad arguments, a missing or busy workspace: the message says what and where."""


class CheckpointError(UserError):
    """A checkpoint file that is missing, not ours, corrupted, or inconsistent with its config."""


class Interrupted(Exception):
    """Ctrl-C (SIGINT), honoured: the message says what was saved. The command line exits with 130
    (128 + SIGINT, the shell's convention), never 0 (success) or 2 (a user error) — issue 17."""
