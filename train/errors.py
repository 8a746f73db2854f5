"""The training layer's one exception type."""

from cleftwise.errors import CleftwiseError


class TrainError(CleftwiseError):
    """A training or evaluation config, dataset or checkpoint is invalid; names the key at fault."""

