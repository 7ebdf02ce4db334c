"""Checkpoints that any layout can load.

Each rank writes, to `step-N.tmp/shard-R.pt`, the blocks of the whole net's tensors (weights and SGD
momentum; `blocks.py`) that it holds and no lower rank holds (a replica writes nothing); after a
barrier rank 0 writes `meta.json` and renames the folder to `step-N`, so a crash mid-save leaves the
last complete checkpoint untouched. Loading places every shard's blocks into whole-net tensors and
takes out the blocks the loading layout holds: a checkpoint from paper-split loads into single,
weird-trick, or a different world size. Checkpoints of format 1 (a list of pieces per
shard) load too.

No RNG state is saved because none is needed: dropout masks depend on (seed, step, layer) and data
order and augmentation on (seed, epoch, sample), so step N of a resumed run is step N of the straight one.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import types
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from alexnet_mp.blocks import WHOLE, Block, block_as_offsets, copy_overlap, local, merge, offsets_as_block, rows
from alexnet_mp.errors import Diverged, UsageError, WriteFailed
from alexnet_mp.model import ARCHITECTURES, build_model, full_shapes
from alexnet_mp.strategies import Strategy
from alexnet_mp.world import barrier, current

FORMAT = 2
READS = (1, FORMAT)
PREFIX = "step-"
DOOMED = "removing-"  # a checkpoint being deleted is renamed out of PREFIX's namespace first
BlockRead = tuple[str, Block, Tensor, Tensor | None]  # a shard's block: key, block, weights, momentum or None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        """The next step to run."""
        return int(self.meta["step"])


def save(directory: Path, strategy: Strategy, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
         keep: int) -> Path:
    """Writes a checkpoint of every rank's shard (collective: every rank calls it). A rank that cannot
    write removes what it began and raises WriteFailed, naming the newest complete checkpoint."""
    final = directory / f"{PREFIX}{meta['step']:08d}"
    staging = final.with_name(final.name + ".tmp")
    try:
        _write(staging, final, strategy, optimizer, meta, keep)
    except ShardsNotShared as error:
        raise _write_error(staging, final, str(error), "give every node the same --output-dir, on a file system "
                           "they share") from None
    except (OSError, RuntimeError) as error:
        cause = _os_error(error)
        if cause is None:  # a lost peer, say: not the file system's
            raise
        raise _write_error(staging, final, cause.strerror or str(cause), "make room") from error
    barrier()
    return final


class ShardsNotShared(Exception):
    """Rank 0 does not see every rank's shard: the ranks of a multi-node run wrote into folders of their own."""


def _write_error(staging: Path, final: Path, reason: str, remedy: str) -> WriteFailed:
    """Removes the unfinished `staging` (a part-written shard would hold the space a full disk lacks); the error
    names the newest complete checkpoint."""
    shutil.rmtree(staging, ignore_errors=True)
    newest = complete_checkpoints(final.parent)
    then = (f"the newest complete one, {newest[-1]}, is intact: {remedy}, then add --resume latest" if newest
            else f"the run has no complete checkpoint yet: {remedy}, then run it again")
    return WriteFailed(f"could not write checkpoint {final} ({reason}); {then}")


def _shard_name(rank: int) -> str:
    return f"shard-{rank:05d}.pt"


def _shard(strategy: Strategy, optimizer: torch.optim.Optimizer) -> list[tuple[str, tuple, Tensor, Tensor | None]]:
    """(key, block as offsets, weights, momentum or None) of each block this rank writes."""
    def momentum(param: Tensor) -> Tensor | None:
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        return None if buffer is None else local(buffer)

    return [(key, block_as_offsets(block, strategy.shapes[key]), local(param).detach(), momentum(param))
            for key, block, param, writes in strategy.blocks() if writes]


def _shard_writers(strategy: Strategy, shard: list[tuple[str, tuple, Tensor, Tensor | None]]) -> tuple[list[int], bool]:
    """The ranks that write a shard (those holding a block no lower rank holds), and whether every rank's
    shard is finite: one tiny all-gather, so that every rank refuses to save a diverged net together."""
    finite = all(bool(torch.isfinite(tensor).all()) for _, _, weights, momentum in shard
                 for tensor in (weights, momentum) if tensor is not None)
    flags = torch.tensor([float(bool(shard)), float(finite)], device=strategy.device)
    gathered = [flags]
    if strategy.world_size > 1:
        gathered = [torch.zeros_like(flags) for _ in range(strategy.world_size)]
        dist.all_gather(gathered, flags)
    return [rank for rank, flag in enumerate(gathered) if flag[0].item()], all(flag[1].item() for flag in gathered)


def diverged(directory: Path, what: str) -> Diverged:
    """The error for a run whose numbers stopped being finite; it names the newest checkpoint, which is
    finite, since none is written from non-finite weights or momentum."""
    newest = complete_checkpoints(directory)
    then = (f"the newest checkpoint, {newest[-1]}, is finite: resume from it with a lower --lr" if newest
            else "no checkpoint was written before it: run again with a lower --lr")
    return Diverged(f"{what}; {then}")


def _write(staging: Path, final: Path, strategy: Strategy, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
           keep: int) -> None:
    """Every rank's shard into `staging`; then rank 0 adds meta.json, renames it `final` and drops the
    checkpoints beyond the newest `keep`."""
    if current().is_main:
        remove_incomplete(final.parent)  # this save's staging folder, or a failed one's
    barrier()
    shard = _shard(strategy, optimizer)
    writers, finite = _shard_writers(strategy, shard)
    if not finite:
        raise diverged(final.parent, f"the weights or momentum are not finite at step {meta['step']}, so no "
                                     "checkpoint was written")
    shards = [_shard_name(rank) for rank in writers]
    staging.mkdir(parents=True, exist_ok=True)
    if shard:
        # through a Python file: a full disk is then an OSError (given a path, torch's C++ writer raises
        # only a RuntimeError of its own)
        with open(staging / _shard_name(strategy.rank), "wb") as file:
            torch.save({"blocks": shard}, file)
    barrier()
    if current().is_main:
        # each name looked up once every rank has written: a network file system's cache cannot hide it
        unseen = [name for name in shards if not (staging / name).is_file()]
        if unseen:
            raise ShardsNotShared(f"rank 0 does not see {', '.join(unseen)}, written by other ranks")
        config = strategy.config
        full_meta = {**meta, "format": FORMAT, "mode": strategy.name, "arch": config.arch,
                     "num_classes": config.num_classes, "world_size": strategy.world_size, "shards": shards}
        (staging / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n")
        if final.exists():
            _remove(final)
        os.replace(staging, final)
        for old in complete_checkpoints(final.parent)[:-keep]:
            _remove(old)


def _remove(folder: Path) -> None:
    """Deletes a checkpoint after one atomic rename out of the checkpoint namespace: a kill midway leaves a
    folder no loader takes for a checkpoint (a half-deleted step-N could lack a shard), which the next
    start removes (`remove_incomplete`)."""
    doomed = folder.with_name(DOOMED + folder.name)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def remove_incomplete(directory: Path) -> list[Path]:
    """Deletes what a cut-short save or pruning left in `directory`: staging folders, step folders
    without meta.json, folders renamed for deletion. Only for the process that holds the output folder."""
    if not directory.is_dir():
        return []
    leftovers = sorted(p for p in directory.iterdir() if p.is_dir() and (p.name.startswith(DOOMED) or (
        p.name.startswith(PREFIX) and (p.name.endswith(".tmp") or not (p / "meta.json").is_file()))))
    for leftover in leftovers:
        shutil.rmtree(leftover)
    return leftovers


def _os_error(error: BaseException | None) -> OSError | None:
    """The OSError behind `error`: itself, or the one torch's zip writer was handling when closing the
    file failed in turn (as it does on a full disk, with a RuntimeError)."""
    while error is not None and not isinstance(error, OSError):
        error = error.__cause__ or error.__context__
    return error


def complete_checkpoints(directory: Path) -> list[Path]:
    """Complete checkpoints in `directory`, oldest first."""
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.name.startswith(PREFIX) and not p.name.endswith(".tmp")
             and (p / "meta.json").is_file()]
    return sorted(found, key=lambda p: p.name)


def find(where: str, output_checkpoints: Path) -> Checkpoint:
    """`latest` (the newest complete checkpoint of this output folder) or a checkpoint folder; a folder of
    checkpoints, or a run's --output-dir, stands for its newest."""
    if where == "latest":
        found = complete_checkpoints(output_checkpoints)
        if not found:
            raise UsageError(f"--resume latest: no checkpoint in {output_checkpoints}; start without --resume")
        path = found[-1]
    else:
        path = Path(where)
        if not (path / "meta.json").is_file():
            newest = complete_checkpoints(path) or complete_checkpoints(path / "checkpoints")
            path = newest[-1] if newest else path
    if not (path / "meta.json").is_file():
        raise UsageError(f"{path} is not a checkpoint folder (no meta.json); give step-N, its parent, or the "
                         "run's --output-dir")
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        meta = None
    if not _well_formed(meta):
        raise UsageError(f"{path}/meta.json is corrupt; {_earlier(path)}")
    return Checkpoint(path, meta)


# what a meta.json of any format holds (the save writes these itself), and what a run's adds (its training
# loop's); the types the loaders read them as
META_FIELDS = {"step": int, "format": int, "arch": str, "num_classes": int}
RUN_META_FIELDS = {"config": dict, "scheduler": dict, "shards": list}


def _well_formed(meta: Any) -> bool:
    return isinstance(meta, dict) and all(isinstance(meta.get(key), kind) for key, kind in META_FIELDS.items()) \
        and all(isinstance(meta[key], kind) for key, kind in RUN_META_FIELDS.items() if key in meta)


def resume_point(where: str | None, output_checkpoints: Path) -> Checkpoint | None:
    """The checkpoint a run resumes from, or None for a fresh start. `auto` is `latest` where the output
    folder holds a checkpoint and a fresh start where it holds none: one command a requeued job repeats."""
    if where == "auto":
        where = "latest" if complete_checkpoints(output_checkpoints) else None
    return find(where, output_checkpoints) if where else None


def _earlier(path: Path) -> str:
    """What to do with a checkpoint that cannot be read: the newest complete one before it, by name."""
    earlier = [p for p in complete_checkpoints(path.parent) if p.name < path.name]
    return f"use an earlier checkpoint: {earlier[-1]}" if earlier else "no earlier checkpoint is left beside it"


def check_compatible(checkpoint: Checkpoint, arch: str, num_classes: int) -> None:
    meta = checkpoint.meta
    if meta.get("format") not in READS:
        raise UsageError(f"{checkpoint.path} has checkpoint format {meta.get('format')}, this version reads "
                         f"{' and '.join(map(str, READS))}: load it with the version of alexnet-mp that wrote it")
    if (meta["arch"], meta["num_classes"]) != (arch, num_classes):
        raise UsageError(f"{checkpoint.path} holds --arch {meta['arch']} with {meta['num_classes']} classes; "
                         f"this run is --arch {arch} with {num_classes}: pass the same --arch and --num-classes")


def full_state(checkpoint: Checkpoint) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(weights, momentum) of the whole net, placed together from every shard's blocks."""
    shapes = full_shapes(checkpoint.meta["arch"], checkpoint.meta["num_classes"])
    weights, momentum = [], []
    for key, block, weight, buffer in saved_blocks(checkpoint):
        weights.append((key, block, weight))
        if buffer is not None:
            momentum.append((key, block, buffer))
    return merge(weights, shapes), merge(momentum, shapes)


def saved_blocks(checkpoint: Checkpoint) -> list[BlockRead]:
    """Every block of every shard, memory-mapped: a block's values are read from disk when first touched."""
    shards = sorted(checkpoint.path.glob("shard-*.pt"))
    if not shards:
        raise UsageError(f"{checkpoint.path} has no shard files; {_earlier(checkpoint.path)}")
    missing = [name for name in checkpoint.meta.get("shards", []) if not (checkpoint.path / name).is_file()]
    if missing:
        raise UsageError(f"{checkpoint.path} lacks {', '.join(missing)} of its {len(checkpoint.meta['shards'])} "
                         f"shards; {_earlier(checkpoint.path)}")
    shapes = full_shapes(checkpoint.meta["arch"], checkpoint.meta["num_classes"])
    blocks = []
    for shard in shards:
        try:
            blocks += _read_shard(shard, checkpoint.meta["format"], checkpoint.meta["arch"], shapes)
        except Exception as error:  # a truncated or foreign file: say which, not a stack trace
            raise UsageError(f"{shard} cannot be read ({type(error).__name__}); {_earlier(checkpoint.path)}"
                             ) from None
    return blocks


def _read_shard(path: Path, format_: int, arch: str, shapes: dict[str, torch.Size]) -> list[BlockRead]:
    """(key, block, weights, momentum or None) of every block in a shard file."""
    if format_ == 1:
        return _read_format_1(path, arch, shapes)
    blocks = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["blocks"]
    return [(key, offsets_as_block(offsets), weight, buffer) for key, offsets, weight, buffer in blocks]


class _Format1Piece:
    """What format 1 pickled as `alexnet_mp.model.Piece`: the tower a shard held (None: every conv channel) and
    its (index, count) shard of fc6's and fc7's units; fc8 lived whole on FC shard 0."""

    tower: int | None
    fc_shard: tuple[int, int]

    def block(self, key: str, shape: torch.Size, towers: int) -> Block | None:
        layer = key.split(".")[0]
        if layer == "fc8":
            return WHOLE if self.fc_shard[0] == 0 else None
        if layer in ("fc6", "fc7"):
            return (rows(shape[0], *self.fc_shard),)
        return WHOLE if self.tower is None else (rows(shape[0], self.tower, towers),)


class _Format1Unpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("alexnet_mp.model", "Piece"):
            return _Format1Piece
        return super().find_class(module, name)


_FORMAT_1_PICKLE = types.ModuleType("pickle_format_1")
_FORMAT_1_PICKLE.Unpickler, _FORMAT_1_PICKLE.load = _Format1Unpickler, pickle.load


def _read_format_1(path: Path, arch: str, shapes: dict[str, torch.Size]) -> list[BlockRead]:
    pieces = torch.load(path, map_location="cpu", weights_only=False, mmap=True,
                        pickle_module=_FORMAT_1_PICKLE)["pieces"]
    towers = ARCHITECTURES[arch].towers
    return [(key, piece.block(key, shapes[key], towers), weight, momentum.get(key))
            for piece, state, momentum in pieces for key, weight in state.items()]


def load(checkpoint: Checkpoint, strategy: Strategy, optimizer: torch.optim.Optimizer | None) -> None:
    """Loads a checkpoint of any layout into this rank's blocks (and their momentum): each filled from the saved
    blocks it overlaps, read memory-mapped, so no rank builds the whole net on the way."""
    check_compatible(checkpoint, strategy.config.arch, strategy.config.num_classes)
    saved: dict[str, list[tuple[Block, Tensor, Tensor | None]]] = defaultdict(list)
    for key, block, weight, buffer in saved_blocks(checkpoint):
        saved[key].append((block, weight, buffer))
    with torch.no_grad():
        for key, block, param, _ in strategy.blocks():
            shape = strategy.shapes[key]
            with_momentum = optimizer is not None and all(buffer is not None for _, _, buffer in saved[key])
            # the parameter's device, dtype, memory format and sharding: fused SGD walks both alike
            momentum = torch.empty_like(param) if with_momentum else None
            for saved_block, weight, buffer in saved[key]:
                copy_overlap(local(param), block, weight, saved_block, shape)
                if momentum is not None:
                    copy_overlap(local(momentum), block, buffer, saved_block, shape)
            if momentum is not None:
                optimizer.state[param]["momentum_buffer"] = momentum


def export(checkpoint: Checkpoint, out: Path) -> None:
    """The whole net's weights as a safetensors file: `AlexNet2012`'s keys, or torchvision's for owt."""
    from safetensors.torch import save_file

    weights, _ = full_state(checkpoint)
    model = build_model(checkpoint.meta["arch"], checkpoint.meta["num_classes"])
    model.load_state_dict(weights)
    state = model.torchvision_state_dict() if hasattr(model, "torchvision_state_dict") else model.state_dict()
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({key: value.contiguous() for key, value in state.items()}, str(out),
              metadata={"arch": checkpoint.meta["arch"], "step": str(checkpoint.step)})

