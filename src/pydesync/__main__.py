"""`python -m pydesync` runs the command line."""

from .cli import entry

entry()
