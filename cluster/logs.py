"""One logging setup for every entrypoint (CLI, main job, training job), with secrets redacted.

Every log line passes through `RedactSecrets`: passwords inside URLs (`scheme://user:secret@host`) and the
values of secret-looking environment variables (database password, W&B key, tokens) never reach a log.
"""

from __future__ import annotations

import logging
import os
import re

_URL_PASSWORD = re.compile(r"(\b[a-z][a-z0-9+.-]*://[^:/@\s]+:)([^@\s]+)(@)", re.IGNORECASE)
_SECRET_NAMES = re.compile(r"(PASSWORD|PASSWD|SECRET|TOKEN|API_KEY|ACCESS_KEY)", re.IGNORECASE)


def secret_values() -> list[str]:
    """Values of environment variables whose names say they are secrets (long enough to be worth hiding)."""
    return sorted(
        {value for name, value in os.environ.items() if _SECRET_NAMES.search(name) and len(value) >= 6},
        key=len,
        reverse=True,
    )


def redact(text: str, secrets: list[str] | None = None) -> str:
    text = _URL_PASSWORD.sub(r"\1***\3", text)
    for secret in secret_values() if secrets is None else secrets:
        text = text.replace(secret, "***")
    return text


class RedactSecrets(logging.Filter):
    """Rewrites each record's final message with secrets replaced by ***."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True


def configure_logging(verbose: bool = False) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())
    # Alembic announces each of its plugins at INFO whenever it is imported; that is noise here.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
