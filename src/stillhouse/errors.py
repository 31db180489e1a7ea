"""The one error type a user sees: a message naming what is wrong and where, exit code 2."""


class StillhouseError(Exception):
    """Bad input or an unmet precondition; the CLI prints it as one line and exits with code 2."""

    exit_code = 2
