"""Credential redaction for broker URLs: the one place that decides what a safe URL looks like."""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

_URL_WITH_USERINFO = re.compile(r"\b([a-zA-Z][a-zA-Z0-9+.-]*://)([^/@\s:]*)(:[^/@\s]*)?@")


def redact_url(url: str) -> str:
    """Return `url` with its password replaced by `***` (user names are kept: they help debugging)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return redact_text(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def redact_text(text: str) -> str:
    """Redact every `scheme://user:password@` found anywhere in free text (log lines, errors)."""
    return _URL_WITH_USERINFO.sub(lambda m: f"{m.group(1)}{m.group(2)}{':***' if m.group(3) else ''}@", text)
