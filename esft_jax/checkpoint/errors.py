"""The checkpoint package's one user-facing error (its own module, so every writer and reader
can raise it)."""

from esft_jax.errors import UserError


class CheckpointError(UserError, ValueError):
    """A checkpoint, adapter or output directory that cannot be read or written as asked; the message
    starts with the file or directory."""
