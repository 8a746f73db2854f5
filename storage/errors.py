"""The storage layer's one exception type."""


class StorageError(Exception):
    """A volume, dataset, table or database could not be opened, read or written.

    The message names the path/URL, dataset or key at fault.
    """
