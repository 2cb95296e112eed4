"""Errors that reach the user as one paragraph, without a traceback."""


class APMError(Exception):
    """A problem the user can fix: a setting, a file, a missing download.

    The message is one paragraph that names what is wrong and how to fix it; the command line
    prints it alone and exits with status 2.
    """


class ConfigError(APMError, ValueError):
    """A setting in a config or on the command line is wrong."""


class TeacherUnavailableError(APMError, RuntimeError):
    """A teacher's pretrained weights could not be loaded (offline, no cache, bad path)."""


class UnreadableImageError(APMError, ValueError):
    """An image file cannot be used: not an image, corrupt or truncated, too small, too large."""


class NonFiniteLossError(APMError, RuntimeError):
    """Training produced a NaN or infinite loss too many steps in a row."""
