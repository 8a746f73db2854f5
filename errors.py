"""The one base exception of cleftwise; every layer's own exception type derives from it."""


class CleftwiseError(Exception):
    """Base of StorageError, ModelError, BlockwiseError, PostprocessError and TrainError."""
