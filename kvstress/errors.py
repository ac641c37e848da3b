"""The exceptions every layer shares, and the one base class of the errors a user can fix.

The library raises KvstressError's subclasses (ConfigError, SpecError, TextError,
ModelLoadError, ResultsError, UnsupportedModelError, RankLost); the CLI catches this one
type and prints its message, one line that names the fix, with exit code 2. A stop signal
ends a run with RunInterrupted (after the current step) or StopNow (at once); the command
exits with 128 + the signal.
"""

import signal


class KvstressError(Exception):
    """A user mistake or an unusable input; the message is one line that names the fix."""


class ConfigError(KvstressError, ValueError):
    """A user mistake in the run's options."""


class SpecError(KvstressError, ValueError):
    """A method spec that cannot be built; the message says how to fix it."""


class TextError(KvstressError):
    """A text that cannot be used; the message is one line naming the fix."""


class RunInterrupted(Exception):
    """The user asked the run to stop (Ctrl-C, or SIGTERM); everything finished is already written.

    signum: the signal that asked; the command exits with 128 + signum (130, 143)."""

    def __init__(self, message: str = "", signum: int | None = None):
        super().__init__(message)
        self.signum = signum or signal.SIGINT

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


class StopNow(KeyboardInterrupt):
    """A stop signal that cannot wait for the step to end (a second one, or one during start-up).

    A KeyboardInterrupt, so that no `except Exception` in the libraries underneath swallows it."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def first_line(error: BaseException, default: str | None = None) -> str:
    """An exception's message cut to its first line (what a one-line error can quote), or
    `default`, else the exception's type name, when it has none."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else default if default is not None else type(error).__name__
