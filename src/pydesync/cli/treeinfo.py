"""Tree inspection commands: mtree and digest."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction, parent: argparse.ArgumentParser) -> None:
    """mtree and digest are registered here."""
