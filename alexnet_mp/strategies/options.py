"""A layout's own settings: each declared once, in its layout's module, and from there a flag of `train`,
`plan` and `experiment`, an entry of `TrainConfig.options`, part of the layout's label, and the values a
comparison of layouts covers."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from alexnet_mp.flag_types import takes


@dataclass(frozen=True)
class Option:
    name: str  # its key in TrainConfig.options; the flag is --name with dashes
    help: str
    default: Any  # what the layout runs when the option is not given
    choices: tuple = ()  # the values it takes; empty: any that `parse` reads
    parse: Callable[[str], Any] = str
    label: str = "{}"  # how a layout's label shows a value given: "M={}" gives "pipeline (M=4)"
    compared: tuple = ()  # the values a comparison of layouts covers (the benchmark); empty: not varied
    planned: Any = None  # what `plan` assumes when not told; None: `default`

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")

    def value(self, options: Mapping[str, Any]) -> Any:
        """Its value in a run's `options` (TrainConfig.options), the default where not given."""
        return options.get(self.name, self.default)

    def accepts(self, value: Any) -> bool:
        """Whether it takes `value` (one read back from a run's config.json, which may hold anything)."""
        return value in self.choices if self.choices else takes(self.parse, value)

    def taken(self) -> str:
        """What it takes, in words."""
        if self.choices:
            return f"one of: {', '.join(map(str, self.choices))}"
        return f"what {self.flag} takes: {self.help}"

    def planned_value(self) -> Any:
        return self.default if self.planned is None else self.planned


def label(mode: str, options: tuple[Option, ...], given: Mapping[str, Any]) -> str:
    """A layout with the options it was given: 'paper-split', 'pipeline (1f1b, M=4)'."""
    shown = [option.label.format(given[option.name]) for option in options if given.get(option.name) is not None]
    return mode + (f" ({', '.join(shown)})" if shown else "")
