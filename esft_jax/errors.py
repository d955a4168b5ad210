"""The one user-error type: the input is wrong (a config key, a file, a line of data, a setting).

Every such error derives from `UserError`; the CLI prints its message as one line and exits 2. The
message names what to fix (`--config.KEY`, the file and line) and carries no traceback. Each module's
own error (CheckpointError, DataError, ...) derives from it, so a caller can catch either.
"""


class UserError(Exception):
    """Input the user can fix; the message starts with where it is (a key, a file, a line)."""
