"""The post-processing layer's one exception type."""

from cleftwise.errors import CleftwiseError


class PostprocessError(CleftwiseError):
    """Post-processing input or state is invalid; the message names the block, volume or id."""
