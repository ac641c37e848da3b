"""The one base class of the errors a user can fix.

The library raises subclasses (ConfigError, SpecError, TextError, ModelLoadError,
ResultsError, UnsupportedModelError); the CLI catches this one type and prints its
message, one line that names the fix, with exit code 2.
"""


class KvstressError(Exception):
    """A user mistake or an unusable input; the message is one line that names the fix."""
