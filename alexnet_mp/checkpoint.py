"""Checkpoints that any layout can load.

Each rank writes, to `step-N.tmp/shard-R.pt`, the blocks of the whole net's tensors (weights and SGD
momentum; `blocks.py`) that it holds and no lower rank holds (a replica writes nothing); after a
barrier rank 0 writes `meta.json` and renames the folder to `step-N`, so a crash mid-save leaves the
last complete checkpoint untouched. Loading places every shard's blocks into whole-net tensors and
takes out the blocks the loading layout holds: a checkpoint from paper-split loads into single,
weird-trick, or a different world size.

A checkpoint is a file a user hands in, so nothing in it runs: shards are read with `weights_only=True`,
and every shard's SHA-256, recorded in meta.json as it is written, is verified before its blocks are read.

No RNG state is saved because none is needed: dropout masks depend on (seed, step, layer) and data
order and augmentation on (seed, epoch, sample), so step N of a resumed run is step N of the straight one.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from alexnet_mp.blocks import Block, block_as_offsets, copy_overlap, local, merge, offsets_as_block
from alexnet_mp.errors import Diverged, UsageError, WriteFailed
from alexnet_mp.flag_types import COUNT, POSITIVE_INT, takes
from alexnet_mp.model import ARCHITECTURES, build_model, full_shapes
from alexnet_mp.strategies import Layout
from alexnet_mp.world import barrier, current

FORMAT = 2
PREFIX = "step-"
SHARD_NAME = re.compile(r"shard-\d{5}\.pt")
DOOMED = "removing-"  # a checkpoint being deleted is renamed out of PREFIX's namespace first
SET_ASIDE = ".set-aside"  # a step-N folder without meta.json that a save of step N would replace
BlockRead = tuple[str, Block, Tensor, Tensor | None]  # a shard's block: key, block, weights, momentum or None


@dataclass(frozen=True)
class Checkpoint:
    path: Path
    meta: dict[str, Any]

    @property
    def step(self) -> int:
        """The next step to run."""
        return int(self.meta["step"])


def save(directory: Path, layout: Layout, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
         keep: int) -> Path:
    """Writes a checkpoint of every rank's shard (collective: every rank calls it). A rank that cannot
    write removes what it began and raises WriteFailed, naming the newest complete checkpoint."""
    final = directory / f"{PREFIX}{meta['step']:08d}"
    staging = final.with_name(final.name + ".tmp")
    try:
        _write(staging, final, layout, optimizer, meta, keep)
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


def _shard(layout: Layout, optimizer: torch.optim.Optimizer) -> list[tuple[str, tuple, Tensor, Tensor | None]]:
    """(key, block as offsets, weights, momentum or None) of each block this rank writes."""
    def momentum(param: Tensor) -> Tensor | None:
        buffer = optimizer.state.get(param, {}).get("momentum_buffer")
        return None if buffer is None else local(buffer)

    return [(key, block_as_offsets(block, layout.shapes[key]), local(param).detach(), momentum(param))
            for key, block, param, writes in layout.blocks() if writes]


def _shard_writers(layout: Layout, shard: list[tuple[str, tuple, Tensor, Tensor | None]]) -> tuple[list[int], bool]:
    """The ranks that write a shard (those holding a block no lower rank holds), and whether every rank's
    shard is finite: one tiny all-gather, so that every rank refuses to save a diverged net together."""
    finite = all(bool(torch.isfinite(tensor).all()) for _, _, weights, momentum in shard
                 for tensor in (weights, momentum) if tensor is not None)
    flags = torch.tensor([float(bool(shard)), float(finite)], device=layout.device)
    gathered = [flags]
    if layout.world_size > 1:
        gathered = [torch.zeros_like(flags) for _ in range(layout.world_size)]
        dist.all_gather(gathered, flags)
    return [rank for rank, flag in enumerate(gathered) if flag[0].item()], all(flag[1].item() for flag in gathered)


def diverged(directory: Path, what: str) -> Diverged:
    """The error for a run whose numbers stopped being finite; it names the newest checkpoint, which is
    finite, since none is written from non-finite weights or momentum."""
    newest = complete_checkpoints(directory)
    then = (f"the newest checkpoint, {newest[-1]}, is finite: resume from it with a lower --lr" if newest
            else "no checkpoint was written before it: run again with a lower --lr")
    return Diverged(f"{what}; {then}")


def _write(staging: Path, final: Path, layout: Layout, optimizer: torch.optim.Optimizer, meta: dict[str, Any],
           keep: int) -> None:
    """Every rank's shard into `staging`; then rank 0 adds meta.json, renames it `final` and drops the
    checkpoints beyond the newest `keep`."""
    if current().is_main:
        remove_incomplete(final.parent)  # this save's staging folder, or a failed one's
    barrier()
    shard = _shard(layout, optimizer)
    writers, finite = _shard_writers(layout, shard)
    if not finite:
        raise diverged(final.parent, f"the weights or momentum are not finite at step {meta['step']}, so no "
                                     "checkpoint was written")
    shards = [_shard_name(rank) for rank in writers]
    staging.mkdir(parents=True, exist_ok=True)
    digest = bytes(hashlib.sha256().digest_size)
    if shard:
        # through a Python file: a full disk is then an OSError (given a path, torch's C++ writer raises
        # only a RuntimeError of its own); hashed on the way, so the file is not read back
        with open(staging / _shard_name(layout.rank), "wb") as file:
            hashing = _HashingWriter(file)
            torch.save({"blocks": shard}, hashing)
            digest = hashing.digest()
    digests = _gathered(digest, layout)  # every rank has written once this returns
    if current().is_main:
        # each name looked up once every rank has written: a network file system's cache cannot hide it
        unseen = [name for name in shards if not (staging / name).is_file()]
        if unseen:
            raise ShardsNotShared(f"rank 0 does not see {', '.join(unseen)}, written by other ranks")
        config = layout.config
        full_meta = {**meta, "format": FORMAT, "mode": layout.name, "arch": config.arch,
                     "num_classes": config.num_classes, "world_size": layout.world_size, "shards": shards,
                     "sha256": {_shard_name(rank): digests[rank].hex() for rank in writers}}
        (staging / "meta.json").write_text(json.dumps(full_meta, indent=2) + "\n")
        if (final / "meta.json").is_file():  # this run's own, from before a resume from an earlier one
            _remove(final)
        elif final.exists():  # not a checkpoint this program completed: kept, out of the way
            _set_aside(final)
        os.replace(staging, final)
        for old in complete_checkpoints(final.parent)[:-keep]:
            _remove(old)


def _set_aside(folder: Path) -> None:
    """Renames `folder` to a free name out of the checkpoint namespace, with a warning."""
    aside = next(candidate for number in itertools.count(1) if not (candidate := folder.with_name(
        folder.name + SET_ASIDE + (f"-{number}" if number > 1 else ""))).exists())
    os.replace(folder, aside)
    print(f"warning: {folder} had no meta.json, so it is no checkpoint; it is kept as {aside.name}", file=sys.stderr)


class _HashingWriter:
    """A binary file that hashes what is written through it (all torch.save asks of a file: write, flush)."""

    def __init__(self, file: Any) -> None:
        self.file, self.hash = file, hashlib.sha256()

    def write(self, data: bytes) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def digest(self) -> bytes:
        return self.hash.digest()


def _gathered(digest: bytes, layout: Layout) -> list[bytes]:
    """Every rank's `digest`, in rank order (one small all-gather)."""
    if layout.world_size == 1:
        return [digest]
    mine = torch.tensor(list(digest), dtype=torch.uint8, device=layout.device)
    gathered = [torch.zeros_like(mine) for _ in range(layout.world_size)]
    dist.all_gather(gathered, mine)
    return [bytes(tensor.tolist()) for tensor in gathered]


def _remove(folder: Path) -> None:
    """Deletes a checkpoint after one atomic rename out of the checkpoint namespace: a kill midway leaves a
    folder no loader takes for a checkpoint (a half-deleted step-N could lack a shard), which the next
    start removes (`remove_incomplete`)."""
    doomed = folder.with_name(DOOMED + folder.name)
    os.replace(folder, doomed)
    shutil.rmtree(doomed)


def remove_incomplete(directory: Path, named: Path | None = None) -> list[Path]:
    """Deletes what this program's own save and pruning can leave in `directory` when cut short: staging
    folders (`step-N.tmp`) and folders renamed for deletion. Never a `step-N` folder, whatever it lacks (it
    may hold the only copy of the weights), nor `named`, a checkpoint the command line names. Only for the
    process that holds the output folder."""
    if not directory.is_dir():
        return []
    spared = named.resolve() if named is not None else None
    leftovers = sorted(p for p in directory.iterdir() if p.is_dir() and p.resolve() != spared and (
        p.name.startswith(DOOMED) or (p.name.startswith(PREFIX) and p.name.endswith(".tmp"))))
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
    checkpoints, or a run's --output-dir, stands for its newest. Its meta.json is checked here, its shards
    when they are read (`saved_blocks`)."""
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
        return Checkpoint(path, _read_meta(path))
    except Unreadable as error:
        raise UsageError(f"{error}; {_earlier(path)}") from None


class Unreadable(Exception):
    """A checkpoint that cannot be used as it is; the message says why, the caller what to do instead."""


# what a meta.json holds (the save writes these itself), with the types the loaders read them as; a training
# run's adds its config and its learning-rate schedule's state (`training_config`)
META_FIELDS = {"step": int, "format": int, "arch": str, "num_classes": int}
SHA256 = re.compile(r"[0-9a-f]{64}")


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        meta = json.loads((path / "meta.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise Unreadable(f"{path}/meta.json is corrupt (not JSON)") from None
    except OSError as error:
        raise Unreadable(f"{path}/meta.json cannot be read ({error.strerror})") from None
    if isinstance(meta, dict) and isinstance(meta.get("format"), int) and meta["format"] != FORMAT:
        raise Unreadable(f"{path} has checkpoint format {meta['format']}; this version reads format {FORMAT} only "
                         "(format 1's shards are pickles, which could run code when loaded): use the version of "
                         "alexnet-mp that wrote it")
    problem = _meta_problem(meta)
    if problem:
        raise Unreadable(f"{path}/meta.json is corrupt ({problem})")
    return meta


def _meta_problem(meta: Any) -> str | None:
    """What is wrong with a meta.json's contents, if anything."""
    if not isinstance(meta, dict):
        return "not an object"
    wrong = [key for key, kind in META_FIELDS.items() if not isinstance(meta.get(key), kind)]
    if wrong:
        return f"no {', '.join(wrong)}"
    if meta["step"] < 0 or meta["num_classes"] < 1 or meta["arch"] not in ARCHITECTURES:
        return f"step {meta['step']}, arch {meta['arch']!r}, {meta['num_classes']} classes"
    shards = meta.get("shards", [])
    if not isinstance(shards, list) or not all(isinstance(name, str) and SHARD_NAME.fullmatch(name)
                                               for name in shards):
        return "shards is not a list of shard-NNNNN.pt names"
    digests = meta.get("sha256")  # absent from checkpoints written before checksums
    if digests is not None and not (isinstance(digests, dict) and sorted(digests) == sorted(shards) and all(
            isinstance(digest, str) and SHA256.fullmatch(digest) for digest in digests.values())):
        return "sha256 does not give one digest per shard"
    return None


# what a resume and `evaluate` read of the config of the run that wrote a checkpoint, as its flags take them
TRAINING_FIELDS = {"seed": COUNT, "batch_size": POSITIVE_INT, "data": str, "dataset": str,
                   "synthetic_size": POSITIVE_INT}


def training_config(checkpoint: Checkpoint) -> dict[str, Any]:
    """The config of the training run that wrote `checkpoint` (what a resume and `evaluate` read), checked."""
    config, schedule = checkpoint.meta.get("config"), checkpoint.meta.get("scheduler")
    wrong = [key for key, parse in TRAINING_FIELDS.items()
             if not (isinstance(config, dict) and takes(parse, config.get(key)))]
    if wrong or not isinstance(schedule, dict):
        raise UsageError(f"{checkpoint.path}/meta.json lacks the training run's config or schedule (no usable "
                         f"{', '.join(wrong or ['scheduler'])}: it was not written by `train`, or was edited); "
                         f"{_earlier(checkpoint.path)}")
    return config


def corrupt(checkpoint: Checkpoint, problem: str) -> UsageError:
    """The one line refusing a checkpoint whose training state (beside its config) cannot be used."""
    return UsageError(f"{checkpoint.path}/meta.json is corrupt ({problem}); {_earlier(checkpoint.path)}")


def resume_point(where: str | None, output_checkpoints: Path) -> Checkpoint | None:
    """The checkpoint a run resumes from, or None for a fresh start. `auto` is `latest` where the output
    folder holds a checkpoint and a fresh start where it holds none: one command a requeued job repeats."""
    if where == "auto":
        where = "latest" if complete_checkpoints(output_checkpoints) else None
    return find(where, output_checkpoints) if where else None


def _earlier(path: Path) -> str:
    """What to do instead of using a checkpoint that cannot be: the newest complete one before it, by name,
    whose meta.json and shards verify."""
    for candidate in reversed([p for p in complete_checkpoints(path.parent) if p.name < path.name]):
        try:
            _checked_blocks(Checkpoint(candidate, _read_meta(candidate)))
        except Unreadable:
            continue
        return f"use an earlier checkpoint: {candidate}"
    return "no earlier checkpoint beside it verifies"


def check_compatible(checkpoint: Checkpoint, arch: str, num_classes: int) -> None:
    meta = checkpoint.meta
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
    """Every block of every shard, memory-mapped (a block's values are read from disk when first touched), once
    each shard's SHA-256 is verified and its blocks are found to be the net's that meta.json names."""
    if "sha256" not in checkpoint.meta and current().is_main:
        print(f"warning: {checkpoint.path} predates shard checksums: its shards are not verified", file=sys.stderr)
    try:
        return _checked_blocks(checkpoint)
    except Unreadable as error:
        raise UsageError(f"{error}; {_earlier(checkpoint.path)}") from None


def _checked_blocks(checkpoint: Checkpoint) -> list[BlockRead]:
    path, meta = checkpoint.path, checkpoint.meta
    names = meta.get("shards") or sorted(p.name for p in path.glob("shard-*.pt"))  # older ones list no shards
    if not names:
        raise Unreadable(f"{path} has no shard files")
    missing = [name for name in names if not (path / name).is_file()]
    if missing:
        raise Unreadable(f"{path} lacks {', '.join(missing)} of its {len(names)} shards")
    shapes = full_shapes(meta["arch"], meta["num_classes"])
    net = f"the {meta['arch']} net with {meta['num_classes']} classes that meta.json names"
    blocks = []
    for name in names:
        shard = path / name
        if "sha256" in meta and _sha256(shard) != meta["sha256"][name]:
            raise Unreadable(f"{shard} does not match the SHA-256 recorded when it was written: it has changed since "
                             "(a disk or copy fault, or an edit)")
        try:
            read = torch.load(shard, map_location="cpu", weights_only=True, mmap=True)["blocks"]
        except Exception as error:  # a truncated or foreign file, or one that asks to run code: say which
            raise Unreadable(f"{shard} cannot be read ({type(error).__name__})") from None
        problems = [_block_problem(entry, shapes) for entry in (read if isinstance(read, list) else [None])]
        if any(problems):
            raise Unreadable(f"{shard} does not hold {net} ({next(filter(None, problems))})")
        blocks += [(key, offsets_as_block(offsets), weight, buffer) for key, offsets, weight, buffer in read]
    uncovered = [key for key in shapes if not _covered(key, blocks, shapes[key])]
    if uncovered:
        raise Unreadable(f"{path}'s shards do not hold all of {net} (not all of {uncovered[0]})")
    return blocks


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _block_problem(entry: Any, shapes: dict[str, torch.Size]) -> str | None:
    """What makes a shard's entry other than a block of the net of `shapes`: (key, offsets, weights, momentum)."""
    if not (isinstance(entry, tuple | list) and len(entry) == 4):
        return "an entry that is not a block"
    key, offsets, weight, momentum = entry
    if key not in shapes:
        return f"a tensor {key!r} that net does not have"
    shape = shapes[key]
    if not (isinstance(offsets, tuple | list) and len(offsets) <= len(shape) and all(
            isinstance(pair, tuple | list) and len(pair) == 2 and all(type(n) is int for n in pair)
            and 0 <= pair[0] < pair[1] <= size for pair, size in zip(offsets, shape, strict=False))):
        return f"{key}'s block lies outside its shape {tuple(shape)}"
    extent = [stop - start for start, stop in offsets] + list(shape[len(offsets):])
    tensors = [weight] if momentum is None else [weight, momentum]
    if not all(isinstance(tensor, Tensor) and tensor.is_floating_point() and list(tensor.shape) == extent
               for tensor in tensors):
        return f"{key}'s block is not {tuple(extent)} floats"
    return None


def _covered(key: str, blocks: list[BlockRead], shape: torch.Size) -> bool:
    """Whether the blocks of `key` together hold every value of its whole tensor. Blocks slice leading
    dimensions, so a mask over those is enough."""
    mine = [block for name, block, _, _ in blocks if name == key]
    depth = max((len(block) for block in mine), default=0)
    mask = torch.zeros(shape[:depth], dtype=torch.bool)
    for block in mine:
        mask[block] = True
    return bool(mine) and bool(mask.all())


def load(checkpoint: Checkpoint, layout: Layout, optimizer: torch.optim.Optimizer | None) -> None:
    """Loads a checkpoint of any layout into this rank's blocks (and their momentum): each filled from the saved
    blocks it overlaps, read memory-mapped, so no rank builds the whole net on the way."""
    check_compatible(checkpoint, layout.config.arch, layout.config.num_classes)
    saved: dict[str, list[tuple[Block, Tensor, Tensor | None]]] = defaultdict(list)
    for key, block, weight, buffer in saved_blocks(checkpoint):
        saved[key].append((block, weight, buffer))
    with torch.no_grad():
        for key, block, param, _ in layout.blocks():
            shape = layout.shapes[key]
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

