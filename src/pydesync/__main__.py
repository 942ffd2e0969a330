"""`python -m pydesync` runs the command line.

Ctrl-C or SIGTERM at any moment, even while the modules are still loading, ends with one
line, not a traceback; `cli.main` cleans up what a command started.
"""

import signal
import sys


def _early_stop(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


signal.signal(signal.SIGTERM, _early_stop)
try:
    from .cli import entry

    entry()
except KeyboardInterrupt:
    sys.stderr.write("Error: interrupted\n")
    sys.exit(130)
