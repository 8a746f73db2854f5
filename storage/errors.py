"""The storage layer's one exception type."""

from cleftwise.errors import CleftwiseError


class StorageError(CleftwiseError):
    """A volume, dataset, table or database could not be opened, read or written.

    The message names the path/URL, dataset or key at fault.
    """
