"""Argument types shared by clanctl's commands: a bad value is a usage error
(exit 2, argparse's one line naming the flag), never a traceback later.

Owns: `seconds` (a finite number above 0) and `count` (a whole number, 0 or
more).  Must never: accept a value the command would then choke on.
"""

from __future__ import annotations

import argparse
import math

__all__ = ["seconds", "count"]


def seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"'{text}': must be a number of seconds above 0")
    return value


def count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"'{text}': must be 0 or more")
    return value
