"""The checkpoint package's one user-facing error (its own module, so every writer and reader
can raise it)."""


class CheckpointError(ValueError):
    """A checkpoint, adapter or output directory that cannot be read or written as asked; the message
    starts with the file or directory."""
