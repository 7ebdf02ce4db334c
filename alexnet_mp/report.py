"""Tables for people: the model summary."""

from __future__ import annotations

from alexnet_mp.cost import LayerCost, layer_costs
from alexnet_mp.model import ARCHITECTURES, Piece


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def _shape(cost: LayerCost) -> str:
    shape = "x".join(map(str, cost.output_shape))
    if cost.block_shape != cost.output_shape:
        shape += " -> pool " + "x".join(map(str, cost.block_shape[1:]))
    return shape


def summary_table(arch: str, num_classes: int = 1000, tower: bool = False) -> str:
    """Per layer: output shape, parameters (whole net, or per tower), forward GFLOPs per image."""
    architecture = ARCHITECTURES[arch]
    towers = architecture.towers if tower else 1
    pieces = [Piece(t, (t, towers)) for t in range(towers)] if tower else [Piece()]
    per_piece = [layer_costs(architecture, num_classes, piece) for piece in pieces]
    names = [cost.name for cost in per_piece[0]]
    header = ["layer"] + [f"tower {t} {col}" for t in range(towers) for col in ("output", "params", "GFLOPs")] \
        if tower else ["layer", "output", "params", "GFLOPs"]
    rows = []
    for name in names:
        row = [name]
        for costs in per_piece:
            cost = next((c for c in costs if c.name == name), None)
            row += [_shape(cost), f"{cost.parameters:,}", f"{cost.flops / 1e9:.3f}"] if cost else ["-", "0", "0"]
        rows.append(row)
    totals = ["total"]
    for costs in per_piece:
        totals += ["", f"{sum(c.parameters for c in costs):,}", f"{sum(c.flops for c in costs) / 1e9:.3f}"]
    rows.append(totals)
    title = f"{arch} net, {num_classes} classes, input 3x224x224" + (", per tower" if tower else "")
    return title + "\n\n" + markdown_table(header, rows)
