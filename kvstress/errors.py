"""The one base class of the errors a user can fix.

The library raises subclasses (ConfigError, SpecError, TextError, ModelLoadError,
ResultsError, UnsupportedModelError); the CLI catches this one type and prints its
message, one line that names the fix, with exit code 2.
"""


class KvstressError(Exception):
    """A user mistake or an unusable input; the message is one line that names the fix."""


def first_line(error: BaseException, default: str | None = None) -> str:
    """An exception's message cut to its first line (what a one-line error can quote), or
    `default`, else the exception's type name, when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else default if default is not None else type(error).__name__
