"""The `kvstress` command (and `python -m kvstress`).

A stop signal before a command has installed its own handling (control.stop_on_interrupt),
such as a Ctrl-C while typer, rich or torch import, ends the process at once with one line
and 128 + the signal, never a KeyboardInterrupt traceback: nothing was measured yet.
"""

import signal
import sys

from .control import STOP_SIGNALS


def _stop_while_starting(signum: int, frame) -> None:
    sys.stderr.write(f"interrupted: stopped by {signal.Signals(signum).name} while starting; nothing was measured\n")
    raise SystemExit(128 + signum)


def main() -> None:
    for signum in STOP_SIGNALS:
        signal.signal(signum, _stop_while_starting)
    from .cli import app

    app(prog_name="kvstress")


if __name__ == "__main__":
    main()
