"""The blockwise layer's one exception type."""

from cleftwise.errors import CleftwiseError


class BlockwiseError(CleftwiseError):
    """A blockwise job could not be planned, run or resumed; the message names the block or job."""
