"""Errors that reach the user as one paragraph, without a traceback.

The base class and the teacher errors are defined in ``teachers.errors`` (teachers import nothing
from apm) and re-exported here: ``APMError`` is ``teachers.errors.UserError``.
"""

from teachers.errors import ConfigError, TeacherUnavailableError
from teachers.errors import UserError as APMError

__all__ = ["APMError", "ConfigError", "TeacherUnavailableError", "UnreadableImageError",
           "NonFiniteLossError"]


class UnreadableImageError(APMError, ValueError):
    """An image file cannot be used: not an image, corrupt or truncated, too small, too large."""


class NonFiniteLossError(APMError, RuntimeError):
    """Training produced a NaN or infinite loss too many steps in a row."""
