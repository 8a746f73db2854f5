"""The blockwise layer's one exception type."""


class BlockwiseError(Exception):
    """A blockwise job could not be planned, run or resumed; the message names the block or job."""
