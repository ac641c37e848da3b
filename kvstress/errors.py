"""The exceptions every layer shares, and the one base class of the errors a user can fix.

The library raises KvstressError's subclasses (ConfigError, SpecError, TextError,
ModelLoadError, ResultsError, UnsupportedModelError, RankLost, PolicyError); the CLI catches this one
type and prints its message, one line that names the fix, with exit code 2. A stop signal
ends a run with RunInterrupted (after the current step) or StopNow (at once); the command
exits with 128 + the signal.
"""

import signal
import sys
import sysconfig
import traceback
from pathlib import Path


class KvstressError(Exception):
    """A user mistake or an unusable input; the message is one line that names the fix."""


class ConfigError(KvstressError, ValueError):
    """A user mistake in the run's options."""


class SpecError(KvstressError, ValueError):
    """A method spec that cannot be built; the message says how to fix it."""


class TextError(KvstressError):
    """A text that cannot be used; the message is one line naming the fix."""


class PolicyError(KvstressError):
    """A cache policy (a plugin's, usually) handed the cache what it cannot rank: a priority
    of the wrong shape, dtype or device, or holding NaN (kvstress.caches.contract). The
    message names the policy, its hook and the shape expected; the method's point fails."""


class RankLost(KvstressError):
    """Under --tp, another rank died or failed, or a collective timed out: the run cannot go on."""


class MethodFailed(Exception):
    """A method's stream failed on some --tp rank: every rank raises this one, so that all of
    them record the same failed point and go on together (distributed.Ranks.together).

    where: the place the first failing rank names (file:line in function)."""

    def __init__(self, message: str, where: str | None = None):
        super().__init__(message)
        self.where = where


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


def describe_failure(error: Exception) -> str:
    """One line for a method that failed: a kvstress error's message names the fix already; any
    other error is named by its type, since its message may not say what kind of failure it is."""
    if isinstance(error, (KvstressError, MethodFailed)):
        return first_line(error)
    return f"{type(error).__name__}: {first_line(error, '(no message)')}"


def failure_site(error: BaseException) -> str | None:
    """Where `error` was raised, as `folder/file.py:line in function`: the innermost frame
    outside torch, transformers and the standard library, i.e. the code that called into them
    (a policy's own line rather than a kernel's)."""
    libraries = tuple(str(Path(module.__file__).parent) for name in ("torch", "transformers")
                      if (module := sys.modules.get(name)) is not None) + (sysconfig.get_paths()["stdlib"],)
    for frame in reversed(traceback.extract_tb(error.__traceback__)):
        if not frame.filename.startswith(libraries):
            path = Path(frame.filename)
            return f"{path.parent.name}/{path.name}:{frame.lineno} in {frame.name}"
    return None
