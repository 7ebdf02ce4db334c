"""The command line: `python -m alexnet_mp SUBCOMMAND`, and `train.py` for `accelerate launch`."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from contextlib import nullcontext
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from alexnet_mp import checkpoint
from alexnet_mp.arguments import Parser, add_layout_options, add_train_arguments, train_config
from alexnet_mp.config import DECODE_PLACES, TrainConfig
from alexnet_mp.errors import AlexNetMPError, GroupNotFormed, UsageError, first_line, from_torch
from alexnet_mp.flag_types import COUNT, POSITIVE_INT, TFLOPS, number
from alexnet_mp.hardware import DEFAULT_PATH, PRESETS, Hardware
from alexnet_mp.malloc import steady_malloc
from alexnet_mp.model import ARCH_HELP, ARCHITECTURES
from alexnet_mp.preflight import check_run, check_writable, check_writable_file
from alexnet_mp.speed import EAGER, Variant
from alexnet_mp.strategies import LAYOUTS, REFERENCE, all_options, layout_named
from alexnet_mp.tracking import hold_output
from alexnet_mp.world import launched, leave_group, stop_with_launcher

if TYPE_CHECKING:  # the data pipeline (torchvision) is imported by the commands that read data, not by --help
    from alexnet_mp.data import DataSpec


def run_train(config: TrainConfig) -> None:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    from alexnet_mp.loop import train

    launch = launched()
    check_run(config, launch.size)
    steady_malloc()
    if "LOCAL_RANK" in os.environ:  # started by a launcher, not by hand
        stop_with_launcher(config.timeout_s)
    # the main process writes the run's record and decides when checkpoints are complete: it holds the folder
    with hold_output(config.output) if launch.is_main else nullcontext():
        if launch.is_main:
            named = Path(config.resume) if config.resume not in (None, "auto", "latest") else None
            for leftover in checkpoint.remove_incomplete(config.checkpoints, named):
                print(f"removed {leftover}: an incomplete checkpoint (a save or pruning cut short)", file=sys.stderr)
        try:
            accelerator = Accelerator(
                cpu=not torch.cuda.is_available(), mixed_precision=config.mixed_precision,
                project_dir=str(config.output), log_with=None if config.tracker == "none" else config.tracker,
                kwargs_handlers=[InitProcessGroupKwargs(timeout=timedelta(seconds=config.timeout_s))])
        except (RuntimeError, ValueError) as error:  # the process group could not be formed
            raise GroupNotFormed(f"rank {launch.rank} could not join the process group at "
                                 f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')} "
                                 f"({first_line(error)}): check that every rank was started with the same "
                                 "MASTER_ADDR and a free, non-zero MASTER_PORT (--master_port, --main_process_port) "
                                 "that each machine can reach") from None
        try:
            train(config, accelerator)
            leave_group()
        except (RuntimeError, MemoryError) as error:  # torch's own words for a lost peer or exhausted memory
            named_error = from_torch(error, launch.rank)
            if named_error is None:
                raise
            raise named_error from None


def export(args: argparse.Namespace) -> None:
    check_writable_file(Path(args.out), "file to write", "net.safetensors")
    found = checkpoint.find(args.checkpoint, Path(args.checkpoint))
    checkpoint.export(found, Path(args.out))
    print(f"wrote {args.out}: {found.meta['arch']} net, {found.meta['num_classes']} classes, step {found.step}")


def evaluate(args: argparse.Namespace) -> None:
    """One process, one device: the checkpoint merged into the whole net, whatever layout wrote it."""
    from alexnet_mp.data import build_datasets
    from alexnet_mp.loop import evaluate as run_evaluation
    from alexnet_mp.strategies import build

    found = checkpoint.find(args.checkpoint, Path(args.checkpoint))
    meta, trained = found.meta, checkpoint.training_config(found)
    spec = evaluation_data(args, meta["num_classes"], trained)
    _, val_set = build_datasets(spec, trained["seed"])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    layout = build(TrainConfig(mode=REFERENCE, arch=meta["arch"], num_classes=meta["num_classes"]), device)
    checkpoint.load(found, layout, optimizer=None)
    result = run_evaluation(layout, val_set, args.batch_size, args.workers, device)
    crops = "10-crop" if args.ten_crop else "centre crop"
    print(f"{found.path} on {spec.data} ({crops}): loss {result.loss:.4f}  top-1 error {result.top1_error:.4f}  "
          f"top-5 error {result.top5_error:.4f}")


def evaluation_data(args: argparse.Namespace, num_classes: int, trained: dict) -> DataSpec:
    """The validation set `evaluate` scores: --data's, or by default that of the data the checkpoint's
    run trained on (`trained`, its config: its --data, --dataset and --synthetic-size)."""
    from alexnet_mp.data import DataSpec

    dataset = args.dataset or (trained["dataset"] if args.data is None else "imagefolder")
    return DataSpec(args.data or trained["data"], dataset, num_classes,
                    args.synthetic_size or trained["synthetic_size"], args.ten_crop, args.decode_on)


def experiment(args: argparse.Namespace) -> None:
    from alexnet_mp.experiment import run_experiment

    if args.name in ("", ".", "..") or Path(args.name).name != args.name or "\0" in args.name:
        raise UsageError(f"--name {args.name!r}: give one folder name (no '/', not '.' or '..'); the runs go in "
                         f"{args.output_dir}/NAME")
    modes, ranks = args.modes.split(","), _numbers(args.ranks, int, "--ranks")
    hardware = hardware_given(args.hardware)  # a bad profile is refused before the first run
    try:
        failed, runs = run_experiment(args.name, modes, ranks, Path(args.output_dir), args.train_args, hardware)
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM, once the run in hand has stopped
        fail("stopped by a signal: the run in hand stopped (with a checkpoint, if it had begun training), and "
             "the runs after it did not start; the same command with --resume auto goes on", 130)
    if failed:  # after the comparison of the others, and with a status a script can test
        fail(f"{len(failed)} of {runs} runs failed: {', '.join(failed)}; see their output above", 1)


def compare(args: argparse.Namespace) -> None:
    from alexnet_mp.report import compare as compare_runs

    directories = [Path(d) for d in args.runs]
    out = Path(args.out or directories[0].parent)
    check_writable(out, "--out")
    comparison = compare_runs(directories, out, hardware_given(args.hardware))
    for line in comparison.broken:
        print(f"cannot compare {line}", file=sys.stderr)
    if not comparison.rows:
        raise UsageError("no run could be read")
    print(comparison.table)


def plan(args: argparse.Namespace) -> None:
    """Prints the prediction; writes plan.md and plan.png too where --output-dir says."""
    from alexnet_mp.hardware import load, with_links
    from alexnet_mp.plan import plan_at_rate, plan_on_profile

    if args.output_dir:
        check_writable(Path(args.output_dir), "--output-dir")
    if args.links and not args.hardware:
        raise UsageError("--links lends its collectives to a --hardware profile: add --hardware FILE")
    variant = Variant.of_run(vars(args))
    if args.hardware and variant != EAGER:
        raise UsageError("--mixed-precision and --compile plan at a rate; a --hardware profile plans a step as its "
                         "layers ran: calibrate one with those flags, or leave them out")
    gpus, links = _numbers(args.gpus, int, "--gpus"), _numbers(args.link_gbps, float, "--link-gbps")
    per_gpu = args.batch_per_gpu is not None
    batch = args.batch_per_gpu if per_gpu else args.batch
    options = {name: getattr(args, name) for name in all_options()}
    if args.hardware:
        hardware = load(args.hardware)
        if args.links:
            hardware = with_links(hardware, load(args.links))
        text, draw = plan_on_profile(hardware, gpus, args.arch, batch, args.num_classes, options, per_gpu)
    else:
        text, draw = plan_at_rate(gpus, args.arch, batch, args.device_tflops, links, args.num_classes, options,
                                  per_gpu, variant)
    print(text)
    if args.output_dir:
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        (out / "plan.md").write_text(text + "\n![plan](plan.png)\n")
        draw(out / "plan.png")
        print(f"wrote {out / 'plan.md'} and {out / 'plan.png'}")


def _numbers(text: str, kind: type, flag: str) -> list:
    """A flag's comma-separated numbers of `kind`, each checked as a positive number flag checks its one."""
    parse = number(kind, kind(0), exclusive=True)
    try:
        return [parse(part) for part in text.split(",")]
    except argparse.ArgumentTypeError as error:
        raise UsageError(f"{flag} takes positive finite numbers, not {text!r} ({error})") from None
    except ValueError:
        raise UsageError(f"{flag} takes comma-separated numbers, e.g. {flag} 1,2,4; not {text!r}") from None


def bench(args: argparse.Namespace) -> None:
    from alexnet_mp.bench import bench as run_bench

    check_writable(Path(args.output_dir), "--output-dir")
    ranks = tuple(_numbers(args.ranks, int, "--ranks")) if args.ranks else None
    modes = tuple(args.modes.split(",")) if args.modes else None
    for mode in modes or ():
        layout_named(mode)  # an unknown one is refused before anything runs
    failed = run_bench(Path(args.output_dir), args.quick, ranks, modes, hardware_given(args.hardware), args.launches)
    if failed:  # the others are measured and written
        fail(f"{'; '.join(failed)} (the others are in {Path(args.output_dir) / 'bench.md'})", 1)


def hardware_given(name_or_path: str | None) -> Hardware | None:
    """The profile --hardware names (a file or a preset); without it, this machine's if `calibrate` saved one."""
    from alexnet_mp.hardware import load

    if name_or_path is None:
        return load(DEFAULT_PATH) if DEFAULT_PATH.exists() else None
    return load(name_or_path)


def nets_named(text: str) -> tuple[str, ...]:
    """An argparse type: nets by name, comma-separated, each one of ARCHITECTURES."""
    nets = tuple(dict.fromkeys(name.strip() for name in text.split(",")))
    unknown = [net for net in nets if net not in ARCHITECTURES]
    if unknown:
        raise argparse.ArgumentTypeError(f"no net {unknown[0]!r}: choose from {', '.join(sorted(ARCHITECTURES))}")
    return nets


def calibrate(args: argparse.Namespace) -> None:
    import time

    from alexnet_mp.calibrate import calibrate as measure

    out = Path(args.output)
    check_writable_file(out, "--output", DEFAULT_PATH.name)
    started = time.perf_counter()
    variant = Variant.of_run(vars(args))
    profile = measure(_numbers(args.ranks, int, "--ranks"), args.arch, args.batch,
                      log=lambda line: print(line, file=sys.stderr, flush=True), variant=variant)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(profile.to_json(), indent=2) + "\n")
    print(f"wrote {out} in {time.perf_counter() - started:.0f} s: `plan --hardware {out}`, and `bench`, `experiment` "
          "and `compare` read it")


def summary(args: argparse.Namespace) -> None:
    from alexnet_mp.report import summary_table

    if args.tower and ARCHITECTURES[args.arch].towers == 1:
        raise UsageError(f"--tower: the {args.arch} net has one column; use --arch paper")
    print(summary_table(args.arch, args.num_classes, tower=args.tower))


HARDWARE_HELP = (f"predict each run's step on this hardware profile (a `calibrate` file, or a preset: "
                 f"{', '.join(PRESETS)}) beside its measurement (default: {DEFAULT_PATH} where `calibrate` wrote it)")


def parser() -> argparse.ArgumentParser:
    root = Parser(prog="python -m alexnet_mp", description=__doc__)
    commands = root.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="train (use `accelerate launch train.py` for several processes)")
    add_train_arguments(train)
    train.set_defaults(run=lambda args: run_train(train_config(args)))
    table = commands.add_parser("summary", help="per-layer output shapes, parameters and FLOPs")
    table.add_argument("--arch", default="paper", choices=sorted(ARCHITECTURES), help=ARCH_HELP)
    table.add_argument("--num-classes", type=POSITIVE_INT, default=1000)
    table.add_argument("--tower", action="store_true", help="per tower (paper net)")
    table.set_defaults(run=summary)
    out = commands.add_parser("export", help="a checkpoint of any layout as one safetensors state_dict")
    out.add_argument("checkpoint", help="a checkpoint folder (step-N); a folder of them, or a run's --output-dir, "
                                        "for its newest")
    out.add_argument("out", help="the .safetensors file to write")
    out.set_defaults(run=export)
    check = commands.add_parser("evaluate", help="top-1/top-5 error of a checkpoint on a validation set")
    check.add_argument("checkpoint", help="as export's")
    check.add_argument("--data", help="'synthetic', a folder with val/, or CIFAR-10 batches (default: the data "
                                      "the checkpoint's run trained on)")
    check.add_argument("--dataset", choices=["imagefolder", "cifar10"],
                       help="default: imagefolder with --data, else the run's")
    check.add_argument("--ten-crop", action="store_true")
    check.add_argument("--synthetic-size", type=POSITIVE_INT,
                       help="with --data synthetic: the training set's size, the validation set is 1/8 of it "
                            "(default: the run's)")
    check.add_argument("--batch-size", type=POSITIVE_INT, default=100)
    check.add_argument("--workers", type=COUNT, default=2)
    check.add_argument("--decode-on", default="workers", choices=DECODE_PLACES,
                       help="where JPEGs are decoded (see train --help)")
    check.set_defaults(run=evaluate)
    # no abbreviations: the runner's --modes would take a training run's --mode
    runner = commands.add_parser("experiment", help="run several layouts on the same batches, then compare them; "
                                                    "arguments it does not know go to each training run",
                                 allow_abbrev=False)
    runner.add_argument("--name", required=True)
    runner.add_argument("--modes", default=",".join(LAYOUTS), help="the layouts to run (default: every one)")
    runner.add_argument("--ranks", default="2", help="processes for every mode but the one-device reference; "
                                                       "several (2,4): each mode at each")
    runner.add_argument("--output-dir", default="runs")
    runner.add_argument("--hardware", help=HARDWARE_HELP)
    runner.set_defaults(run=experiment)
    report = commands.add_parser("compare", help="a table and plots from run folders (config.json, metrics.jsonl)")
    report.add_argument("runs", nargs="+")
    report.add_argument("--out", help="where comparison.md and the plots go (default: the first run's parent)")
    report.add_argument("--hardware", help=HARDWARE_HELP)
    report.set_defaults(run=compare)
    model = commands.add_parser("plan", help="predicted bytes, compute, step time and memory per layout and GPU count")
    model.add_argument("--gpus", default="1,2,4,8,16")
    model.add_argument("--batch", type=POSITIVE_INT, default=128, help="the global batch at every GPU count")
    model.add_argument("--batch-per-gpu", type=POSITIVE_INT,
                       help="instead of --batch: this many images per GPU, the global batch growing with the GPUs, "
                            "as the 2014 paper scales (128 per GPU)")
    model.add_argument("--link-gbps", default="16,64,450",
                       help="link bandwidths in gigabytes per second per direction (PCIe 3 x16, PCIe 5 x16, NVLink 4)")
    model.add_argument("--device-tflops", type=TFLOPS, default=70.0,
                       help="TFLOP/s one GPU sustains on these layers, not its datasheet peak (default: what the "
                            "paper net's fastest step sustained on an H100, docs/results/; `bench` prints it "
                            "for your device and net)")
    add_layout_options(model, defaults=True)
    model.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                       help="at a rate: plan the links and memory of a step that runs as `train --mixed-precision` "
                            "(default no: float32)")
    model.add_argument("--compile", action="store_true",
                       help="at a rate: plan the memory of a step that runs as `train --compile`")
    model.add_argument("--hardware", help="a hardware profile (`calibrate --output FILE`) or a preset: "
                                           f"{', '.join(PRESETS)}; instead of --device-tflops and --link-gbps; it "
                                           "plans a step as its layers ran (its precision and speed-ups)")
    model.add_argument("--links", help="with --hardware: its collectives from this profile or preset instead (a "
                                       "profile calibrated on one GPU, planned on more: --links h100-nvlink)")
    model.add_argument("--arch", default="paper", choices=sorted(ARCHITECTURES), help=ARCH_HELP)
    model.add_argument("--num-classes", type=POSITIVE_INT, default=1000)
    model.add_argument("--output-dir", help="write plan.md and plan.png there too (default: print only)")
    model.set_defaults(run=plan)
    timing = commands.add_parser("bench", help="every layout's training step timed side by side, against the plain "
                                               "PyTorch loop, and the input pipeline alone")
    timing.add_argument("--quick", action="store_true", help="the whole matrix in a tiny configuration")
    timing.add_argument("--output-dir", default="runs/bench", help="where bench.json and bench.md go")
    timing.add_argument("--ranks", help="world sizes at which every layout is measured (default 2,4)")
    timing.add_argument("--modes", help="comma-separated layouts to measure alone, beside the one-device step "
                                        "(default: every layout, the plain loop and the input pipeline)")
    timing.add_argument("--hardware", help=HARDWARE_HELP)
    timing.add_argument("--launches", type=POSITIVE_INT, default=1,
                        help="launch the matrix this many times over and show each measurement's median launch, "
                             "with every launch's step: for a machine whose speed moves between launches")
    timing.set_defaults(run=bench)
    measuring = commands.add_parser("calibrate", help="measure this machine into a hardware profile: each layer's "
                                                      "and each collective's time, for the cost model")
    measuring.add_argument("--ranks", default="2,4", help="rank counts whose threads and collectives to measure")
    measuring.add_argument("--arch", default="paper", type=nets_named,
                           help=f"the nets whose layers to time, comma-separated ({', '.join(sorted(ARCHITECTURES))})"
                                "; the first's also sets the probe and the memory figures")
    measuring.add_argument("--batch", type=POSITIVE_INT,
                           help="the global batch the runs use: each layer is timed at passes of up to so many images "
                                "(default: bench's on a CPU)")
    measuring.add_argument("--output", default=str(DEFAULT_PATH))
    measuring.add_argument("--mixed-precision", choices=("no", "bf16"), default="no",
                           help="time the layers as `train --mixed-precision` runs them (default: float32)")
    measuring.add_argument("--channels-last", action="store_true", help="... as `train --channels-last` runs them")
    measuring.add_argument("--compile", action="store_true",
                           help="... as `train --compile` runs them: each conv layer compiled at each pass size")
    measuring.set_defaults(run=calibrate)
    return root


def main(argv: Sequence[str] | None = None) -> None:
    try:
        args, args.train_args = parser().parse_known_args(argv)
        if args.train_args and args.command != "experiment":
            parser().parse_args(argv)  # refuses the unknown arguments
        args.run(args)
    except AlexNetMPError as error:
        fail(str(error), error.exit_code, error.names_rank)


def fail(message: str, code: int, names_rank: bool = False) -> None:
    """Every process says its error: a launcher may kill the others as soon as one exits, so a line left to
    rank 0 could be lost. Other ranks name themselves first where the message does not."""
    rank = launched().rank
    prefix = "" if names_rank or rank == 0 else f"rank {rank}: "
    print(f"{prefix}error: {message}", file=sys.stderr)
    raise SystemExit(code) from None


def train_main() -> None:
    """`train.py`: the train subcommand's arguments, for `accelerate launch train.py --mode ...`."""
    main(["train", *sys.argv[1:]])
