"""Errors that reach the user as one paragraph, without a traceback.

They are defined in this package so that teachers depend on nothing of the training code, which
re-exports them (its ``APMError`` is ``UserError`` itself).
"""


class UserError(Exception):
    """A problem the user can fix: a setting, a file, a missing download.

    The message is one paragraph that names the setting that is wrong and how to fix it; the
    command line prints it alone and exits with status 2.
    """


class ConfigError(UserError, ValueError):
    """A setting in a config or on the command line is wrong."""


class TeacherUnavailableError(UserError, RuntimeError):
    """A teacher's pretrained weights could not be loaded (offline, no cache, bad path)."""
