"""Tables and plots for people: the model summary, and the comparison of runs."""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alexnet_mp.config import MIXED_PRECISIONS, TrainConfig
from alexnet_mp.cost import LayerCost, held_shares, layer_costs
from alexnet_mp.errors import UsageError
from alexnet_mp.flag_types import POSITIVE_INT, is_number, takes
from alexnet_mp.model import ARCHITECTURES, tower_block
from alexnet_mp.predict import HELD_HEADER, Held, StepFigures, held_said, held_table, predict_run
from alexnet_mp.speed import Variant
from alexnet_mp.strategies import LAYOUTS, REFERENCE, check_layout
from alexnet_mp.trace import TRACE
from alexnet_mp.tracking import CorruptRecord, read_metrics, run_label

if TYPE_CHECKING:
    from alexnet_mp.hardware import Hardware


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def pyplot() -> Any:
    """matplotlib's pyplot, drawing to files (no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, out: Path) -> Path:
    """Writes `figure` to `out`, laid out, and frees it."""
    figure.tight_layout()
    figure.savefig(out, dpi=100)
    pyplot().close(figure)
    return out


def _shape(cost: LayerCost) -> str:
    shape = "x".join(map(str, cost.output_shape))
    if cost.block_shape != cost.output_shape:
        shape += " -> pool " + "x".join(map(str, cost.block_shape[1:]))
    return shape


def summary_table(arch: str, num_classes: int = 1000, tower: bool = False) -> str:
    """Per layer: output shape, parameters (whole net, or per tower of the paper split), forward GFLOPs per
    image."""
    architecture = ARCHITECTURES[arch]
    towers = architecture.towers if tower else 1
    shares = [held_shares(tower_block, arch, t, towers, num_classes) for t in range(towers)] if tower else [None]
    per_part = [layer_costs(architecture, num_classes, share) for share in shares]
    names = [cost.name for cost in per_part[0]]
    header = ["layer"] + [f"tower {t} {col}" for t in range(towers) for col in ("output", "params", "GFLOPs")] \
        if tower else ["layer", "output", "params", "GFLOPs"]
    rows = []
    for name in names:
        row = [name]
        for costs in per_part:
            cost = next((c for c in costs if c.name == name), None)
            row += [_shape(cost), f"{cost.parameters:,}", f"{cost.flops / 1e9:.3f}"] if cost else ["-", "0", "0"]
        rows.append(row)
    totals = ["total"]
    for costs in per_part:
        totals += ["", f"{sum(c.parameters for c in costs):,}", f"{sum(c.flops for c in costs) / 1e9:.3f}"]
    rows.append(totals)
    title = f"{arch} net, {num_classes} classes, input 3x224x224" + (", per tower" if tower else "")
    return title + "\n\n" + markdown_table(header, rows)


# -- comparing runs --

WARM_UP_STEPS = 2  # left out of the speed figures: first steps pay for allocation and caches


class BrokenRun(Exception):
    """A run folder whose record cannot be read: the comparison names it and goes on."""


@dataclass
class RunSummary:
    """One run's record, reduced to what the comparison shows."""

    path: Path
    config: dict
    steps: list[int]
    losses: list[float]
    images_per_s: list[float]
    step_s: list[float]
    comm_wait_s: list[float]
    data_wait_s: list[float]
    wall_s: list[float]
    comm_bytes: list[list[float]]  # per step, per rank
    peak_memory_mb: list[float]
    training_memory_mb: list[float] | None  # per rank: the peak less what was in use before the net was built
    label: str = ""  # `run_label`, and the folder where another run of the comparison has the same
    spans: list[dict] = field(default_factory=list)  # of its trace.json where `train --trace` wrote one

    def __post_init__(self) -> None:
        self.label = self.label or run_label(self.config)

    def steady(self, values: list[float]) -> list[float]:
        return values[WARM_UP_STEPS:] if len(values) > WARM_UP_STEPS else values

    @property
    def bytes_per_rank(self) -> list[float]:
        """Median bytes each rank sent per step."""
        return [_median(list(rank)) for rank in zip(*self.comm_bytes, strict=True)]

    @property
    def compute_s(self) -> list[float]:
        """Per step: the step's time not spent blocked on communication."""
        return [step - wait for step, wait in zip(self.step_s, self.comm_wait_s, strict=True)]


def read_run(directory: Path) -> RunSummary:
    """A run folder's record, checked for what the comparison reads (BrokenRun, saying what is wrong, if not)."""
    if not directory.is_dir():
        raise BrokenRun(f"{directory}: not a run folder (one with config.json and metrics.jsonl)")
    try:
        config = json.loads((directory / "config.json").read_text())
        rows = read_metrics(directory / "metrics.jsonl")
    except FileNotFoundError as error:
        raise BrokenRun(f"{directory}: {Path(error.filename).name} is missing") from None
    except json.JSONDecodeError as error:
        raise BrokenRun(f"{directory}: config.json is not JSON ({error.msg})") from None
    except CorruptRecord as error:
        raise BrokenRun(f"{directory}: {error}") from None
    problem = config_problem(config)
    if problem:
        raise BrokenRun(f"{directory}: config.json is not a run's config ({problem})")
    steps = [row for row in rows if "loss" in row]
    if not steps:
        raise BrokenRun(f"{directory}: metrics.jsonl holds no training step")
    for row in steps:
        problem = step_problem(row, config["world_size"])
        if problem:
            raise BrokenRun(f"{directory}: metrics.jsonl's step {row['step']} {problem}")
    try:
        spans = trace_spans(directory / TRACE) if (directory / TRACE).is_file() else []
    except (OSError, ValueError) as error:  # JSON's and UTF-8's decode errors among them
        raise BrokenRun(f"{directory}: {TRACE} is not a trace `train --trace` writes ({error}); move it aside to "
                        "compare the run without its timeline") from None
    return RunSummary(directory, config, [r["step"] for r in steps], [r["loss"] for r in steps],
                      [r["images_per_s"] for r in steps], [r["step_time_s"] for r in steps],
                      [r["comm_wait_s"] for r in steps], [r["data_wait_s"] for r in steps],
                      [r["wall_s"] for r in steps], [r["comm_bytes"] for r in steps], steps[-1]["peak_memory_mb"],
                      steps[-1].get("training_memory_mb"), spans=spans)


RUN_COUNTS = ("world_size", "batch_size", "num_classes")  # a run's config.json: each a whole number, 1 or more
STEP_FIGURES = ("loss", "images_per_s", "step_time_s", "comm_wait_s", "data_wait_s", "wall_s")  # a step's row
RANK_FIGURES = ("comm_bytes", "peak_memory_mb")  # a step's row: a number per rank
OPTIONAL_RANK_FIGURES = ("training_memory_mb",)  # as RANK_FIGURES, absent from older records


def config_problem(config: Any) -> str | None:
    """What the comparison cannot read in a run's config.json, if anything: its layout and net, its counts, its
    precision, and a run its layout makes (`check_layout`'s line where not)."""
    if not isinstance(config, dict):
        return "not an object"
    mode, arch = config.get("mode"), config.get("arch")
    if not (isinstance(mode, str) and mode in LAYOUTS):
        return f"mode {mode!r} is no layout this version has"
    if not (isinstance(arch, str) and arch in ARCHITECTURES):
        return f"arch {arch!r} is no net this version has"
    wrong = [key for key in RUN_COUNTS if not takes(POSITIVE_INT, config.get(key))]
    if wrong:
        return f"{', '.join(wrong)} not a count of 1 or more"
    if config.get("mixed_precision", "no") not in MIXED_PRECISIONS:
        return f"mixed_precision {config['mixed_precision']!r} is not one of: {', '.join(MIXED_PRECISIONS)}"
    try:
        check_layout(layout_settings(config), config["world_size"])
    except UsageError as refused:
        return str(refused)
    return None


def layout_settings(config: Mapping[str, Any]) -> TrainConfig:
    """A run's layout, net, batch, classes and layout options given, from its config.json."""
    options = {option.name: config[option.name] for option in LAYOUTS[config["mode"]].options
               if config.get(option.name) is not None}
    return TrainConfig(mode=config["mode"], arch=config["arch"], batch_size=config["batch_size"],
                       num_classes=config["num_classes"], options=options)


def step_problem(row: Mapping[str, Any], ranks: int) -> str | None:
    """What the comparison cannot read in a training step's row of metrics.jsonl, if anything."""
    missing = [key for key in (*STEP_FIGURES, *RANK_FIGURES) if key not in row]
    if missing:
        return f"lacks {missing[0]!r}"
    wrong = [key for key in STEP_FIGURES if not is_number(row[key])]
    wrong += [key for key in (*RANK_FIGURES, *OPTIONAL_RANK_FIGURES) if key in row and not (
        isinstance(row[key], list) and len(row[key]) == ranks and all(map(is_number, row[key])))]
    return f"has {', '.join(wrong)} not as train writes them (a number, or one per rank)" if wrong else None


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def comparison_rows(runs: list[RunSummary]) -> tuple[list[str], list[list[str]]]:
    reference = next((run for run in runs if run.config["mode"] == REFERENCE), None)
    header = ["run", "arch", "global batch", "images/s (min-max)", "step ms: compute + comm wait + data wait",
              "bytes sent/step per rank", "peak MiB per rank", "final loss", f"max loss diff vs {REFERENCE}"]
    rows = []
    for run in runs:
        speed = run.steady(run.images_per_s)
        breakdown = " + ".join(f"{1000 * _median(run.steady(v)):.0f}" for v in
                               (run.compute_s, run.comm_wait_s, run.data_wait_s))
        if reference is None:
            difference = "-"
        else:
            by_step = dict(zip(reference.steps, reference.losses, strict=True))
            common = [abs(loss - by_step[step]) for step, loss in zip(run.steps, run.losses, strict=True)
                      if step in by_step]
            difference = f"{max(common):.2e}" if common else "-"
        rows.append([run.label, run.config["arch"], str(run.config["batch_size"]),
                     f"{_median(speed):.1f} ({min(speed):.1f}-{max(speed):.1f})", breakdown,
                     " / ".join(f"{b:,.0f}" for b in run.bytes_per_rank),
                     " / ".join(f"{m:.0f}" for m in run.peak_memory_mb),
                     f"{run.losses[-1]:.4f}", difference])
    return header, rows


def plot_comparison(runs: list[RunSummary], out: Path) -> list[Path]:
    plt = pyplot()
    labels = [run.label for run in runs]
    written = []

    def save(figure, name: str) -> None:
        written.append(save_figure(figure, out / name))

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(labels, [_median(run.steady(run.images_per_s)) for run in runs])
    axis.set_ylabel("images/s (median after warm-up)")
    axis.tick_params(axis="x", rotation=20)
    save(figure, "images_per_s.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    bottom = [0.0] * len(runs)
    for part, values in (("compute", [r.steady(r.compute_s) for r in runs]),
                         ("communication wait", [r.steady(r.comm_wait_s) for r in runs]),
                         ("data wait", [r.steady(r.data_wait_s) for r in runs])):
        heights = [1000 * _median(v) for v in values]
        axis.bar(labels, heights, bottom=bottom, label=part)
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    axis.set_ylabel("ms per step (median)")
    axis.legend()
    axis.tick_params(axis="x", rotation=20)
    save(figure, "step_time_breakdown.png")

    figure, (by_step, by_time) = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        by_step.plot(run.steps, run.losses, label=run.label)
        by_time.plot(run.wall_s, run.losses, label=run.label)
    by_step.set(xlabel="step", ylabel="loss")
    by_time.set(xlabel="wall time (s)", ylabel="loss")
    by_step.legend()
    save(figure, "loss.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    axis.bar(labels, [max(run.bytes_per_rank) / 2**20 for run in runs])
    axis.set_ylabel("MiB sent per step (busiest rank)")
    axis.tick_params(axis="x", rotation=20)
    save(figure, "bytes_per_step.png")
    return written


def _tell_apart(runs: list[RunSummary]) -> None:
    """Runs that share a label (one layout at two batch sizes, say) are labelled with their folders as well:
    the table's rows and the plots' bars and curves would otherwise be indistinguishable, or drawn on top
    of each other."""
    labels = [run.label for run in runs]
    for run in runs:
        if labels.count(run.label) > 1:
            run.label = f"{run.label} [{run.path}]"


@dataclass
class Comparison:
    header: list[str]
    rows: list[list[str]]
    broken: list[str]  # one line per run that could not be read
    plots: list[Path] = field(default_factory=list)
    held: list[Held] = field(default_factory=list)  # each run's step beside the cost model's, given a profile
    spans: list[list[str]] = field(default_factory=list)  # `SPAN_HEADER`'s rows, for traced runs beside a prediction
    unpredicted: dict[str, str] = field(default_factory=dict)  # by run, why the profile given cannot predict it

    @property
    def table(self) -> str:
        return markdown_table(self.header, self.rows) if self.rows else ""

    def tables(self) -> dict[str, tuple[list[str], list[list[str]]]]:
        """Its tables by name (header, rows): the runs side by side, each beside its prediction if made, why the
        others are not predicted, and the spans where the prediction misses most if runs were traced."""
        return {"comparison": (self.header, self.rows),
                **({"predicted": (HELD_HEADER, held_table(self.held))} if self.held else {}),
                **({"not_predicted": (["run", "why"], [[run, why] for run, why in self.unpredicted.items()])}
                   if self.unpredicted else {}),
                **({"spans": (SPAN_HEADER, self.spans)} if self.spans else {})}


def compare(directories: list[Path], out: Path, hardware: Hardware | None = None) -> Comparison:
    """The comparison of the readable runs (Markdown written to out/comparison.md, with PNG plots beside it,
    and out/comparison.json for tools), each run's step beside the cost model's on `hardware` where one is
    given; and one line per run that could not be read."""
    runs, broken = [], []
    for directory in directories:
        try:
            runs.append(read_run(directory))
        except BrokenRun as error:
            broken.append(str(error))
    if not runs:
        return Comparison([], [], broken)
    _tell_apart(runs)
    out.mkdir(parents=True, exist_ok=True)
    header, rows = comparison_rows(runs)
    predicted, unpredicted = held_runs(runs, hardware) if hardware else ({}, {})
    held = list(predicted.values())
    if hardware:
        header = [*header, "predicted step ms (error)"]
        rows = [[*row, f"{1000 * h.predicted.step_s:.0f} ({h.error['step_s']:+.0%})" if (h := predicted.get(run.label))
                 else "-"] for row, run in zip(rows, runs, strict=True)]
    plots = plot_comparison(runs, out)
    timeline = plot_timelines(runs, held, out / "timeline.png")
    spans = {run.label: rank_0_spans(run, predicted[run.label]) for run in runs if run.label in predicted}
    comparison = Comparison(header, rows, broken, plots + ([timeline] if timeline else []), held,
                            span_rows({run: by_name for run, by_name in spans.items() if by_name}), unpredicted)
    held_text = held_section(held, hardware, unpredicted=unpredicted)
    (out / "comparison.md").write_text(comparison.table + "\n\n" + held_text + "\n\n" + span_section(comparison.spans)
                                       + "\n".join(f"![{p.stem}]({p.name})" for p in comparison.plots) + "\n")
    record = {"hardware": None if hardware is None else {"name": hardware.name, "source": hardware.provenance},
              "runs": [run_record(run, predicted.get(run.label), spans.get(run.label), unpredicted.get(run.label))
                       for run in runs]}
    (out / "comparison.json").write_text(json.dumps(record, indent=2) + "\n")
    return comparison


def run_record(run: RunSummary, held: Held | None, spans: dict[str, dict[str, float]] | None,
               not_predicted: str | None) -> dict[str, Any]:
    """A run in comparison.json: its figures beside the prediction (with rank 0's traced spans beside the predicted
    ones where it was traced), or its measured figures and why it was not predicted."""
    if held:
        return {**held.to_json(), **({"rank_0_spans": spans} if spans else {})}
    return {"run": run.label, "measured": asdict(measured(run)),
            **({"not_predicted": not_predicted} if not_predicted else {})}


def held_runs(runs: list[RunSummary], hardware: Hardware) -> tuple[dict[str, Held], dict[str, str]]:
    """By run label, each run's measurement beside the cost model's prediction on `hardware`; and why the others
    are not predicted (a net the profile has no times for, or a precision or speed-up its layers did not run in)."""
    held, unpredicted = {}, {}
    for run in runs:
        try:
            held[run.label] = held_run(run, hardware)
        except UsageError as refused:
            unpredicted[run.label] = str(refused)
    return held, unpredicted


def held_section(held: list[Held], hardware: Hardware | None, launches: Mapping[str, list[float]] | None = None,
                 unpredicted: Mapping[str, str] | None = None) -> str:
    """The Markdown section of each run's figures beside the cost model's on `hardware` (comparison.md's, bench.md's,
    with each run's step in each launch where bench launched it several times), with why the `unpredicted` runs are
    not; or the line saying no profile was given."""
    if hardware is None:
        return "No hardware profile given: no step predicted (`python -m alexnet_mp calibrate`, then `--hardware`)."
    parts = [f"## Predicted beside measured: {hardware.name} ({hardware.provenance})"]
    if held:
        parts += [markdown_table(HELD_HEADER, held_table(held)), held_said(held, launches)]
    if unpredicted:
        parts.append("Not predicted:" + "".join(f"\n- {run}: {reason}" for run, reason in unpredicted.items()))
    return "\n\n".join(parts)


def measured(run: RunSummary) -> StepFigures:
    """A run's step as measured (medians after warm-up), in the terms the cost model predicts."""
    return StepFigures(_median(run.steady(run.step_s)), _median(run.steady(run.compute_s)),
                       _median(run.steady(run.comm_wait_s)), run.bytes_per_rank, run.training_memory_mb)


def held_run(run: RunSummary, hardware: Hardware) -> Held:
    """A run's measurement beside the cost model's prediction of it on `hardware`."""
    settings = layout_settings(run.config)
    predicted = predict_run(settings.mode, settings.arch, run.config["world_size"], settings.batch_size, hardware,
                            settings.num_classes, settings.options, Variant.of_run(run.config))
    return Held(run.label, measured(run), predicted.figures(), predicted.timeline)


COLOURS = {"compute": "tab:blue", "communication": "tab:orange", "data": "tab:green", "optimizer": "tab:purple"}


def trace_spans(trace: Path) -> list[dict]:
    """The spans ("X" events) of a Chrome trace `train --trace` wrote; ValueError, saying why, for a file it did not
    write."""
    raw = json.loads(trace.read_text())
    events = raw.get("traceEvents") if isinstance(raw, dict) else None
    if not (isinstance(events, list) and all(isinstance(event, dict) for event in events)):
        raise ValueError("no list of events")
    spans = [event for event in events if event.get("ph") == "X"]
    if not all(type(span.get("pid")) is int and isinstance(span.get("cat"), str) and isinstance(span.get("name"), str)
               and is_number(span.get("ts")) and is_number(span.get("dur")) for span in spans):
        raise ValueError("a span without its rank, category, name, start and length")
    return spans


def traced_step(events: list[dict]) -> dict[int, list[tuple[str, float, float]]]:
    """Per rank, the spans (`trace_spans`) of the first step `train --trace` recorded (category, start and end in
    seconds since the step's first span on any rank), up to rank 0's optimizer step."""
    ends = sorted(e["ts"] + e["dur"] for e in events if e["cat"] == "optimizer" and e["pid"] == 0)
    if not ends:
        return {}
    step = [e for e in events if e["ts"] < ends[0]]
    begin = min(e["ts"] for e in step)
    spans: dict[int, list[tuple[str, float, float]]] = {}
    for e in step:
        start = (e["ts"] - begin) / 1e6
        spans.setdefault(e["pid"], []).append((e["cat"], start, start + e["dur"] / 1e6))
    return spans


def rank_0_spans(run: RunSummary, held: Held) -> dict[str, dict[str, float]]:
    """Rank 0's seconds a step in each span `train --trace` recorded for `run` (the mean over its traced steps, the
    spans of one name summed) beside the predicted timeline's spans of that name; none if the run was not traced."""
    if not run.spans:
        return {}
    events = [e for e in run.spans if e["pid"] == 0]
    steps = sum(e["name"] == "optimizer step" for e in events) or 1
    measured_s: dict[str, float] = defaultdict(float)
    for event in events:
        measured_s[event["name"]] += event["dur"] / 1e6 / steps
    predicted_s: dict[str, float] = defaultdict(float)
    for span in held.timeline[0]:
        predicted_s[span.name] += span.end_s - span.start_s
    return {name: {"measured_s": measured_s[name], "predicted_s": predicted_s[name]}
            for name in dict.fromkeys([*measured_s, *predicted_s])}


# The spans of rank 0's step where a traced run and its prediction differ most, a row each
SPAN_HEADER = ["run", "rank 0's span", "measured ms a step", "predicted ms a step", "measured - predicted ms"]
MISSES_SHOWN = 5


def span_rows(spans: dict[str, dict[str, dict[str, float]]]) -> list[list[str]]:
    """Per run (its `rank_0_spans`), the `MISSES_SHOWN` spans whose measured and predicted time differ most."""
    rows = []
    for run, by_name in spans.items():
        missed = sorted(by_name.items(), key=lambda item: -abs(item[1]["measured_s"] - item[1]["predicted_s"]))
        rows += [[run, name, f"{1000 * s['measured_s']:.1f}", f"{1000 * s['predicted_s']:.1f}",
                  f"{1000 * (s['measured_s'] - s['predicted_s']):+.1f}"] for name, s in missed[:MISSES_SHOWN]]
    return rows


def span_section(rows: list[list[str]]) -> str:
    """comparison.md's section of `span_rows`, or nothing where no traced run was predicted."""
    if not rows:
        return ""
    return ("## Where the prediction misses, span by span\n\nRank 0's traced step against the cost model's timeline "
            "of it, the spans that differ most (ms a step; spans of one name summed).\n\n"
            f"{markdown_table(SPAN_HEADER, rows)}\n\n")


def plot_timelines(runs: list[RunSummary], held: list[Held], out: Path) -> Path | None:
    """For each run that `train --trace` recorded: its ranks as rows over one step, compute, communication, data
    and the optimizer coloured, idle time blank; below them, where a prediction was made, the cost model's
    timeline of each rank's step, paler. None if no run was traced."""
    traced = [(run, traced_step(run.spans)) for run in runs if run.spans]
    traced = [(run, spans) for run, spans in traced if spans]
    if not traced:
        return None
    plt = pyplot()
    from matplotlib.patches import Patch

    predicted = {h.run: h.timeline for h in held}
    rows = [len(spans) + len(predicted.get(run.label, [])) for run, spans in traced]
    figure, axes = plt.subplots(len(traced), 1, figsize=(10, 1.2 + 0.6 * sum(n + 1 for n in rows)), squeeze=False)
    for axis, (run, spans) in zip(axes[:, 0], traced, strict=True):
        labels = []
        for row, rank in enumerate(sorted(spans)):
            for category, start, end in spans[rank]:
                axis.barh(row, 1000 * (end - start), left=1000 * start, color=COLOURS.get(category, "grey"))
            labels.append(f"rank {rank}")
        for rank, predicted_spans in enumerate(predicted.get(run.label, [])):
            for span in predicted_spans:
                axis.barh(len(labels), 1000 * (span.end_s - span.start_s), left=1000 * span.start_s,
                          color=COLOURS[span.category], alpha=0.5)
            labels.append(f"rank {rank}, predicted")
        axis.set_yticks(range(len(labels)), labels=labels)
        axis.invert_yaxis()
        axis.set(title=run.label, xlabel="ms since the step began")
    handles = [Patch(color=colour, label=name) for name, colour in COLOURS.items()]
    axes[0, 0].legend(handles=handles, fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return save_figure(figure, out)
