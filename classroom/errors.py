"""The errors the platform adds to the lesson's, and the one place any failure becomes one of them.

Every error a page shows is a source.QuLabError: the lesson's own (validation, not found) pass
through as they are; everything else is logged with its traceback and turned into a short
message that names what failed and what to check, with every secret masked (as_qulab_error).
"""

from __future__ import annotations

import logging

from sqlalchemy.exc import OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError

import source
from classroom.config import ConfigurationError, Settings, mask_url, redact_secrets
from classroom.diagnosis import diagnose_database_failure

logger = logging.getLogger("qulab")


class PlatformError(source.QuLabError):
    """An error of the platform's, its message cleared of every remembered secret."""

    def __init__(self, message: str) -> None:
        super().__init__(redact_secrets(message))


class BackendUnavailableError(PlatformError):
    """The database could not be reached, or stayed busy too long."""


class OperationTimeoutError(PlatformError):
    """An operation took longer than the page is willing to wait."""


class UnexpectedError(PlatformError):
    """Something failed that QuLab did not foresee; the details are in the server log."""


def as_qulab_error(error: Exception, what: str, settings: Settings) -> source.QuLabError:
    """Any failure as an error a page may show.

    QuLabErrors stay as they are; the rest are logged and named.
    """
    if isinstance(error, source.QuLabError):
        return error
    diagnosis = diagnose_database_failure(error, settings)
    if diagnosis is not None:  # a cause QuLab can name: the message says what to check
        logger.warning("database unavailable in %s: %s", what, diagnosis.message, exc_info=error)
        if diagnosis.configuration:
            return ConfigurationError(diagnosis.message)
        return BackendUnavailableError(diagnosis.message)
    if isinstance(error, (OperationalError, PoolTimeoutError, OSError)):
        logger.exception("database unavailable in %s", what)
        where = mask_url(settings.database_url) if settings.database_url else "the embedded files"
        return BackendUnavailableError(
            f"The database ({where}) did not answer ({type(error).__name__}); nothing was "
            "changed. Check that it is running and that DATABASE_URL is right, then try again."
        )
    logger.exception("unexpected error in %s", what)
    return UnexpectedError(
        f"Something went wrong ({type(error).__name__}); nothing was changed. "
        "The details are in the server log."
    )
