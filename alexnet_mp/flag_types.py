"""argparse types for numbers, checked as the command line is read, before anything runs: shared by the
program's own flags and the layouts' (strategies/)."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import TypeVar

N = TypeVar("N", int, float)


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
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


COUNT, POSITIVE_INT = number(int, 0), number(int, 1)  # e.g. --workers, --batch-size
NON_NEGATIVE_FLOAT, POSITIVE_FLOAT = number(float, 0.0), number(float, 0.0, exclusive=True)  # --lr, --timeout
