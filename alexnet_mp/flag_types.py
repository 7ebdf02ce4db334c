"""argparse types for numbers, checked as the command line is read, before anything runs: shared by the
program's own flags and the layouts' (strategies/)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar

N = TypeVar("N", int, float)
LARGEST_INT = 2 ** 63 - 1  # torch's: a larger count, size or seed cannot reach a tensor or a generator


def number(kind: Callable[[str], N], lowest: N, exclusive: bool = False) -> Callable[[str], N]:
    """An argparse type: a finite `kind` of at least `lowest` (more than it if `exclusive`), refused while
    the command line is read, before anything runs."""
    def parse(text: str) -> N:
        value = kind(text)
        if not math.isfinite(value):  # NaN compares False with everything, so the bound alone lets it in
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if value < lowest or (exclusive and value == lowest):
            raise argparse.ArgumentTypeError(f"must be {'more than' if exclusive else 'at least'} {lowest:g}, "
                                             f"not {text}")
        if isinstance(value, int) and value > LARGEST_INT:
            raise argparse.ArgumentTypeError(f"must be at most {LARGEST_INT}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


COUNT, POSITIVE_INT = number(int, 0), number(int, 1)  # e.g. --workers, --batch-size
NON_NEGATIVE_FLOAT, POSITIVE_FLOAT = number(float, 0.0), number(float, 0.0, exclusive=True)  # --lr, --timeout


def holds(parse: Callable[[str], Any], value: Any) -> bool:
    """Whether `value`, read back from a file (which may hold anything), is one that `parse` reads from a
    command line: a bool or a float is no int, a float out of range none of `number`'s."""
    try:
        return parse(str(value)) == value
    except (ValueError, argparse.ArgumentTypeError):
        return False
