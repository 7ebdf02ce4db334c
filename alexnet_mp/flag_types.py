"""argparse types for numbers, checked as the command line is read, before anything runs: shared by the
program's own flags and the layouts' (strategies/); and the same checks of numbers read back from a file."""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar

N = TypeVar("N", int, float)
LARGEST_INT = 2 ** 63 - 1  # torch's: a larger count, size or seed cannot reach a tensor or a generator


def number(kind: Callable[[str], N], lowest: N, exclusive: bool = False, highest: N | None = None,
           ) -> Callable[[str], N]:
    """An argparse type: a finite `kind` of at least `lowest` (more than it if `exclusive`) and at most
    `highest` (an int: `LARGEST_INT` where not given), refused while the command line is read, before
    anything runs."""
    top = LARGEST_INT if highest is None and kind is int else highest

    def parse(text: str) -> N:
        value = kind(text)
        if not math.isfinite(value):  # NaN compares False with everything, so the bound alone lets it in
            raise argparse.ArgumentTypeError(f"must be a finite number, not {text}")
        if value < lowest or (exclusive and value == lowest):
            raise argparse.ArgumentTypeError(f"must be {'more than' if exclusive else 'at least'} {lowest:g}, "
                                             f"not {text}")
        if top is not None and value > top:
            raise argparse.ArgumentTypeError(f"must be at most {top if kind is int else f'{top:g}'}, not {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names it in "invalid int value: 'x'"
    return parse


COUNT, POSITIVE_INT = number(int, 0), number(int, 1)  # e.g. --workers, --batch-size
NON_NEGATIVE_FLOAT = number(float, 0.0)  # e.g. --lr, --momentum
SECONDS = number(float, 0.0, exclusive=True, highest=1e9)  # past it, torch's clocks in nanoseconds overflow
TFLOPS = number(float, 0.0, exclusive=True, highest=1e6)  # an exaFLOP/s, past any one device


def is_number(value: Any) -> bool:
    """Whether `value`, read back from JSON, is a number: an int or a float, and not a bool (an int to Python)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def takes(parse: Callable[[str], Any], value: Any) -> bool:
    """Whether `value`, read back from a file (which may hold anything), is one that `parse` reads from a
    command line: a bool or a float is no int, a float out of range none of `number`'s."""
    try:
        return parse(str(value)) == value
    except (ValueError, argparse.ArgumentTypeError):
        return False
