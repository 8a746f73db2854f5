"""The models layer's one exception type."""

from cleftwise.errors import CleftwiseError


class ModelError(CleftwiseError):
    """A model could not be built or a checkpoint could not be loaded; names the mismatch."""
