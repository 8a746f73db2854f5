"""The synapse DB password, kept out of configs, ledgers and logs.

A DB URL may name a user without a password (``mongodb://user@host/db``); the password is then
taken, only when the store is opened (:func:`cleftwise.storage.db.open_store`), from

- the environment variable ``CLEFTWISE_DB_PASSWORD``, or
- the file named by ``CLEFTWISE_DB_PASSWORD_FILE`` (its first line; the pipeline config's
  ``db_password_file`` sets this variable),

and is never written back into any config, identity or message.
"""

from __future__ import annotations

import os
import re
from typing import Optional
from urllib.parse import quote

from cleftwise.storage.errors import StorageError

__all__ = ["PASSWORD_ENV", "PASSWORD_FILE_ENV", "db_password", "with_password", "use_password_file"]

PASSWORD_ENV = "CLEFTWISE_DB_PASSWORD"
PASSWORD_FILE_ENV = "CLEFTWISE_DB_PASSWORD_FILE"

#: scheme://user@ (a user, no password) at the start of a URL
_USER_ONLY = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*://)([^:/@?#]+)@")


def db_password() -> Optional[str]:
    """The password from ``CLEFTWISE_DB_PASSWORD`` or the file ``CLEFTWISE_DB_PASSWORD_FILE``
    names (first line, without its line end); None when neither is set."""
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    path = os.environ.get(PASSWORD_FILE_ENV)
    if not path:
        return None
    try:
        with open(path) as f:
            line = f.readline()
    except OSError as e:
        raise StorageError(f"DB password file {path} ({PASSWORD_FILE_ENV} / db_password_file) cannot be "
                           f"read: {e.strerror or e}") from None
    return line.rstrip("\r\n")


def with_password(url: str) -> str:
    """``url`` with the password of :func:`db_password` put in after its user name, when the URL
    names a user but no password; otherwise ``url`` unchanged. Use only to open a connection."""
    m = _USER_ONLY.match(str(url))
    if m is None:
        return url
    password = db_password()
    if password is None:
        return url
    return f"{m.group(1)}{m.group(2)}:{quote(password, safe='')}@{url[m.end():]}"


def use_password_file(path: Optional[str]) -> None:
    """Make stores opened from now on (in this process and the workers it starts) read the
    password from file ``path`` (the pipeline config's ``db_password_file``); None: no change."""
    if path:
        os.environ[PASSWORD_FILE_ENV] = os.path.abspath(os.path.expanduser(path))
