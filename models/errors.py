"""The models layer's one exception type."""


class ModelError(Exception):
    """A model could not be built or a checkpoint could not be loaded; names the mismatch."""
