"""The post-processing layer's one exception type."""


class PostprocessError(Exception):
    """Post-processing input or state is invalid; the message names the block, volume or id."""
