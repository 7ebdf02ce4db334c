"""What a run must pass before any process group or data exists: for `train`, and for each run of an
experiment before the first starts."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import torch

from alexnet_mp import checkpoint
from alexnet_mp.config import TrainConfig
from alexnet_mp.errors import UsageError
from alexnet_mp.strategies import check_layout
from alexnet_mp.tracking import RUN_RECORD, require_tracker
from alexnet_mp.world import processes_on_this_machine


def check_run(config: TrainConfig, world_size: int) -> None:
    """Refuses, before any process group or data exists, what the run cannot do on `world_size` ranks: a
    layout that cannot run there (its world size, its batch), more ranks than GPUs, a missing tracker, a
    GPU-only speed-up without a GPU, or an output folder that already holds another run or cannot be written."""
    check_layout(config, world_size)
    check_gpus(world_size)
    check_rendezvous(world_size)
    require_tracker(config.tracker)
    if config.cuda_graphs and not torch.cuda.is_available():
        raise UsageError("--cuda-graphs needs a GPU (none is visible); use --compile alone on a CPU")
    if config.triton_lrn and not (torch.cuda.is_available() and importlib.util.find_spec("triton")):
        raise UsageError("--triton-lrn needs a GPU and Triton (installed with torch's CUDA wheels); drop the flag")
    check_writable(config.output, "--output-dir")
    if not config.resume and checkpoint.complete_checkpoints(config.checkpoints):
        raise UsageError(f"{config.output} already holds a run with checkpoints: add --resume latest to continue "
                         "it, or choose another --output-dir")
    record = [name for name in RUN_RECORD if (config.output / name).exists()]
    if not config.resume and record:
        raise UsageError(f"{config.output} already holds a run's {' and '.join(record)}: choose another --output-dir "
                         "(or remove them to start it afresh)")


def check_gpus(world_size: int) -> None:
    """Each rank on GPUs needs one of its own (NCCL puts no two ranks on one GPU): more processes on a machine
    than it has GPUs are refused in one line, where the surplus ranks failed with CUDA's "invalid device
    ordinal". Ranks that accelerate keeps on the CPU (ACCELERATE_USE_CPU) need none."""
    from accelerate.utils import parse_flag_from_env

    if world_size == 1 or parse_flag_from_env("ACCELERATE_USE_CPU") or not torch.cuda.is_available():
        return
    here, gpus = processes_on_this_machine(world_size), torch.cuda.device_count()
    if here > gpus:
        raise UsageError(f"{here} processes on this machine, {gpus} GPU(s): each rank needs a GPU of its own; launch "
                         f"at most {gpus} per machine, or run them on the CPU with ACCELERATE_USE_CPU=1")


def check_rendezvous(world_size: int) -> None:
    """What keeps ranks from forming their group, or from forming it again after a restart, refused at once
    rather than after --timeout. MASTER_PORT 0 names no port a rank can reach. torchrun restarts ranks
    (--max-restarts) on the rendezvous store its agent shares with them, static or c10d, which keeps the first
    attempt's addresses: the restarted group never forms (pytorch/pytorch#135712) unless the launcher was
    given TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1, with which c10d rendezvous gives each attempt its own store."""
    if world_size > 1 and os.environ.get("MASTER_PORT") == "0":
        raise UsageError("MASTER_PORT is 0, which no rank can reach: give the launcher a free port (torchrun "
                         "--master_port P, accelerate launch --main_process_port P), or torchrun --standalone")
    restarts = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    if restarts and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise UsageError(f"--max-restarts {restarts}: a restarted group could not form on the launcher's shared "
                         "store; launch with TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 and --rdzv-backend c10d "
                         "--rdzv-endpoint HOST:PORT (accelerate launch: --rdzv_backend c10d), and --resume auto")


def check_writable(folder: Path, what: str) -> None:
    """An output folder, or the nearest folder above it that exists, must be one this user can write
    into: refused before the command's work, not when it writes its first file. `what`: the argument
    that names it, for the message."""
    existing = next(path for path in (folder, *folder.parents) if path.exists())
    if not existing.is_dir() or not _takes_files(existing):
        raise UsageError(f"{folder}: {existing} is not a folder this user can write to; choose another {what}")


def _takes_files(folder: Path) -> bool:
    """Whether a file can be made in `folder`: tried, since its mode says nothing for root, nor of a read-only
    or pseudo file system (/proc)."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return True
    except OSError:
        return False


def check_writable_file(path: Path, what: str, example: str) -> None:
    """A file to write: neither a folder nor under one this user cannot write into, refused before the command's
    work. `example`: a file name to suggest inside a folder given instead."""
    if path.is_dir():
        raise UsageError(f"{path} is a folder: name the {Path(example).suffix} file to write, as in {path / example}")
    check_writable(path.parent, what)


