"""The training layer's one exception type."""


class TrainError(Exception):
    """A training or evaluation config, dataset or checkpoint is invalid; names the key at fault."""


def parse_as(cls, data: dict, where: str):
    """``from_dict(cls, data)`` with every config/model error raised as :class:`TrainError`."""
    from cleftwise.models.errors import ModelError
    from cleftwise.storage.config_io import ConfigError, from_dict

    try:
        return from_dict(cls, data, where)
    except (ConfigError, ModelError) as e:
        raise TrainError(str(e)) from e


def load_as(cls, path: str):
    """A YAML file read into ``cls`` (unknown keys and bad values raise :class:`TrainError`)."""
    from cleftwise.models.errors import ModelError
    from cleftwise.storage.config_io import ConfigError, load_config

    try:
        return load_config(cls, path)
    except (ConfigError, ModelError) as e:
        raise TrainError(str(e)) from e
