"""The training layer's one exception type."""


class TrainError(Exception):
    """A training or evaluation config, dataset or checkpoint is invalid; names the key at fault."""
