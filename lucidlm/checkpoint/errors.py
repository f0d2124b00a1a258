"""The one error type a bad checkpoint raises: it always names the file, tensor or field at fault."""


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded as asked (missing file, bad tensor, unknown type)."""
