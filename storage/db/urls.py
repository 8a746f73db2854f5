"""Database URLs as they may be shown: passwords redacted."""

from __future__ import annotations

import re

__all__ = ["redact"]


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for logs, ledgers, markers and errors)."""
    return re.sub(r"(://[^:/@]+:)[^@/]*@", r"\1***@", str(url))
