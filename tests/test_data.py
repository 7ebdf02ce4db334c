"""Datasets on small data the tests make (real JPEG/PNG files, CIFAR-10's pickle format), the
paper's preprocessing, the global batches, and bad data refused in one line."""

from __future__ import annotations

import logging
import pickle
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from alexnet_mp import data
from alexnet_mp.blocks import rows
from alexnet_mp.data import (
    MEAN,
    PCA_EIGENVALUES,
    PCA_EIGENVECTORS,
    STD,
    DataSpec,
    Draws,
    Encoded,
    GlobalBatches,
    build_datasets,
    central_pixels,
    eval_crops,
    jpeg_decoder,
    lighting_shift,
    normalise,
    rank_batches,
)
from alexnet_mp.errors import UsageError
from alexnet_mp.loop import average_crops
from tests.launching import ROOT

CLASSES = ("cat", "dog", "fox")


def write_image_tree(root: Path, per_class: int = 3) -> Path:
    """root/{train,val}/<class>/ with real JPEG and PNG files of different sizes."""
    generator = np.random.default_rng(0)
    for split in ("train", "val"):
        for c, name in enumerate(CLASSES):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(per_class):
                pixels = generator.integers(0, 255, (180 + 20 * i, 300, 3), dtype=np.uint8)
                pixels[..., c] = 250  # a class colour
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")
    return root


def write_cifar(root: Path, per_batch: int = 4) -> Path:
    """CIFAR-10's python format: pickled dicts of uint8 rows (3072 = 3 x 32 x 32, channel-major)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    generator = np.random.default_rng(1)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": generator.integers(0, 255, (per_batch, 3072), dtype=np.uint8),
                 b"labels": [int(x) for x in generator.integers(0, 10, per_batch)]}
        (folder / name).write_bytes(pickle.dumps(batch))
    names = [b"airplane", b"automobile", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    (folder / "batches.meta").write_bytes(pickle.dumps({b"label_names": names}))
    return root


def test_image_folder_yields_uint8_224_crops_with_their_lighting_and_folder_labels(tmp_path):
    train, val = build_datasets(DataSpec(str(write_image_tree(tmp_path))), seed=0)
    assert train.classes == list(CLASSES) and len(train) == 9 and len(val) == 9
    pixels, alpha = train[(4, 0)]
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.uint8
    assert alpha.tolist() == pytest.approx(Draws.of(0, 0, 4).alpha)
    pixels, alpha = val[(0, 0)]
    assert pixels.shape == (3, 224, 224) and not alpha.any()  # no lighting for validation


@pytest.mark.parametrize("device", [
    "cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"))])
def test_batches_reach_the_device_normalised_with_their_labels(tmp_path, device):
    train, _ = build_datasets(DataSpec(str(write_image_tree(tmp_path))), seed=0)
    batches = GlobalBatches(len(train), 3, seed=0)
    _, images, labels = next(rank_batches(train, batches, slice(0, 3), slice(0, 3), 0, 1, 0, torch.device(device)))
    assert images.shape == (3, 3, 224, 224) and images.dtype == torch.float32 and abs(float(images.mean())) < 3
    assert images.device.type == labels.device.type == device
    first, alpha = train[tuple(int(i) for i in (batches.indices(0)[0], 0))]
    torch.testing.assert_close(images[0].cpu(), normalise(first[None], alpha[None])[0])
    assert labels.tolist() == [train.targets[int(i)] for i in batches.indices(0)]


def test_normalise_is_the_papers_lighting_then_the_channel_statistics():
    pixels = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    alphas = torch.tensor([[0.1, -0.2, 0.05], [0.0, 0.0, 0.0]])
    expected = (pixels.float() / 255 + lighting_shift(alphas).view(2, 3, 1, 1)
                - torch.tensor(MEAN).view(3, 1, 1)) / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(normalise(pixels, alphas), expected)


def test_a_samples_augmentation_depends_only_on_seed_epoch_and_index(tmp_path):
    train, _ = build_datasets(DataSpec(str(write_image_tree(tmp_path))), seed=0)
    torch.manual_seed(123)
    first = train[(2, 0)]
    torch.manual_seed(456)
    assert all(torch.equal(a, b) for a, b in zip(train[(2, 0)], first, strict=True))  # whatever the RNG state
    assert Draws.of(0, 1, 2) != Draws.of(0, 0, 2)  # a new epoch draws a new crop, flip and lighting


def test_cifar10_is_read_from_its_pickles_and_upsampled(tmp_path):
    train, val = build_datasets(DataSpec(str(write_cifar(tmp_path)), dataset="cifar10"), seed=0)
    assert len(train) == 20 and len(val) == 4 and train.classes[0] == "airplane"
    assert train[(0, 0)][0].shape == (3, 224, 224)


def test_lighting_adds_one_colour_shift_along_the_imagenet_principal_components():
    alpha = torch.tensor([0.1, -0.05, 0.2])
    shift = lighting_shift(alpha)
    recovered = torch.linalg.solve(torch.tensor(PCA_EIGENVECTORS), shift) / torch.tensor(PCA_EIGENVALUES)
    torch.testing.assert_close(recovered, alpha)


def test_ten_crop_is_the_mean_of_the_ten_single_crop_softmaxes():
    picture = torch.from_numpy(np.random.default_rng(2).integers(0, 255, (3, 300, 260), dtype=np.uint8))
    crops = eval_crops(central_pixels(picture), ten_crop=True)
    assert crops.shape == (10, 3, 224, 224)
    assert torch.equal(crops[4], eval_crops(central_pixels(picture)))  # the fifth crop is the centre
    logits = torch.randn(2 * 10, 7)
    expected = torch.stack([torch.stack([logits[10 * i + k].softmax(-1) for k in range(10)]).mean(0)
                            for i in range(2)])
    torch.testing.assert_close(average_crops(logits, 10).exp(), expected)


def test_global_batch_is_the_same_whatever_the_rows_a_rank_takes():
    batches = GlobalBatches(dataset_size=100, batch_size=8, seed=3)
    whole = batches.indices(5)
    parts = torch.cat([whole[rows(8, r, 4)] for r in range(4)])
    assert torch.equal(parts, GlobalBatches(100, 8, 3).indices(5))
    assert not torch.equal(batches.indices(5), batches.indices(5 + batches.steps_per_epoch))


def test_a_filled_up_last_batch_holds_the_first_samples_again_and_leaves_them_unscored():
    batches = GlobalBatches(10, 4, seed=0, shuffle=False, fill_last=True)
    assert batches.steps_per_epoch == 3
    assert batches.indices(2).tolist() == [8, 9, 0, 1]
    assert batches.scored(2, slice(0, 4)).tolist() == [True, True, False, False]
    assert batches.scored(2, slice(2, 4)).tolist() == [False, False]
    assert GlobalBatches(10, 4, seed=0).steps_per_epoch == 2  # training: whole batches only


def test_corrupt_image_is_skipped_counted_and_warned_once_with_its_path(tmp_path, caplog):
    root = write_image_tree(tmp_path)
    broken = root / "train" / "dog" / "0.jpg"
    broken.write_bytes(b"not a jpeg")
    train, _ = build_datasets(DataSpec(str(root)), seed=0)
    index = next(i for i in range(len(train)) if train.source.path(i) == str(broken))
    with caplog.at_level(logging.WARNING):
        assert train[(index, 0)][0].shape == (3, 224, 224)  # replaced by the next image of its class
        train[(index, 1)]
    assert int(train.unreadable.sum()) == 1
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert str(broken) in caplog.records[0].getMessage()


def flat_validation_folder(root: Path) -> Path:
    """val/ as ImageNet's validation archive unpacks: every image in the folder itself."""
    for image in list((root / "val").glob("*/*")):
        image.rename(root / "val" / f"{image.parent.name}-{image.name}")
    for folder in (root / "val").iterdir():
        if folder.is_dir():
            folder.rmdir()
    return root


@pytest.mark.parametrize(("make", "message"), [
    (lambda root: root / "missing", "no such folder"),
    (lambda root: (root / "train").mkdir() or (root / "val").mkdir() or root, "no class folders"),
    (lambda root: (root / "train" / "cat").mkdir(parents=True) or root, "has no JPEG or PNG images"),
    (lambda root: flat_validation_folder(write_image_tree(root)), "val holds images but no class folders"),
])
def test_missing_or_empty_data_is_one_clear_error(tmp_path, make, message):
    with pytest.raises(UsageError, match=message):
        build_datasets(DataSpec(str(make(tmp_path))), seed=0)


def test_validation_classes_other_than_the_training_classes_are_one_clear_error(tmp_path):
    """A label is its class folder's position, so a class missing from val/ would shift the rest."""
    shutil.rmtree(write_image_tree(tmp_path) / "val" / CLASSES[0])
    with pytest.raises(UsageError, match=f"different class folders \\({CLASSES[0]}\\)"):
        build_datasets(DataSpec(str(tmp_path)), seed=0)


def test_a_class_count_other_than_the_datas_is_one_clear_error(tmp_path):
    with pytest.raises(UsageError, match="has 3 classes, but 10 are asked for"):
        build_datasets(DataSpec(str(write_image_tree(tmp_path)), num_classes=10), seed=0)


def test_missing_cifar_files_are_named(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(UsageError, match="data_batch_3"):
        build_datasets(DataSpec(str(tmp_path), dataset="cifar10"), seed=0)


@pytest.mark.parametrize(("content", "says"), [(b"\x80\x04\x95", "pickle data was truncated"),
                                               (pickle.dumps({b"labels": [0]}), "no data")])
def test_a_corrupt_cifar_batch_is_named_with_what_is_wrong(tmp_path, content, says):
    write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").write_bytes(content)
    with pytest.raises(UsageError, match=f"data_batch_2 is not a CIFAR-10 python batch \\({says}"):
        build_datasets(DataSpec(str(tmp_path), dataset="cifar10"), seed=0)


def batch_of_everything(dataset, device: str = "cpu", workers: int = 0) -> torch.Tensor:
    """One batch holding every image of `dataset`, as rank_batches hands it to the step."""
    batches = GlobalBatches(len(dataset), len(dataset), seed=0)
    rows = slice(0, len(dataset))
    return next(rank_batches(dataset, batches, rows, rows, 0, 1, workers, torch.device(device)))[1]


def decoded_both_ways(root: Path, on_device: str = "device", **spec: object) -> list[tuple]:
    """(training set, validation set) of `root`, with JPEGs decoded by the workers, then on the device."""
    return [build_datasets(DataSpec(str(root), decode_on=place, **spec), seed=0) for place in ("workers", on_device)]


def test_device_decoding_leaves_jpegs_encoded_and_lets_the_workers_decode_the_rest(tmp_path):
    train, _ = build_datasets(DataSpec(str(write_image_tree(tmp_path)), decode_on="device"), seed=0)
    kinds = {Path(train.source.path(i)).suffix: type(train[(i, 0)][0]) for i in range(len(train))}
    assert kinds == {".jpg": Encoded, ".png": torch.Tensor}


@pytest.fixture
def decoder(request, monkeypatch) -> Iterator[str]:
    """The device's JPEG decoder under test: TorchCodec's, or torchvision's where TorchCodec is absent."""
    jpeg_decoder.cache_clear()
    if request.param == "torchvision":
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # what an absent package gives import
    yield request.param
    jpeg_decoder.cache_clear()


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"], indirect=True)
@pytest.mark.parametrize("workers", [0, 2])
def test_jpegs_decoded_on_the_device_are_the_pixels_the_workers_decode(tmp_path, workers, decoder):
    by_workers, by_device = decoded_both_ways(write_image_tree(tmp_path), ten_crop=True)
    for workers_set, device_set in zip(by_workers, by_device, strict=True):  # training, then ten-crop validation
        torch.testing.assert_close(batch_of_everything(device_set, workers=workers),
                                   batch_of_everything(workers_set, workers=workers), rtol=0, atol=0)


@pytest.mark.slow
def test_jpegs_decoded_on_the_device_in_spawned_workers_are_the_pixels_the_workers_decode(tmp_path, monkeypatch):
    by_workers, by_device = (train for train, _ in decoded_both_ways(write_image_tree(tmp_path), "device-in-workers"))

    def in_this_process(*args: object) -> None:
        raise AssertionError("the training process decoded JPEGs")

    expected = batch_of_everything(by_workers)
    monkeypatch.setattr(data, "_decode_jpegs", in_this_process)  # a spawned worker imports its own module
    torch.testing.assert_close(batch_of_everything(by_device, workers=1), expected, rtol=0, atol=0)


def test_a_jpeg_the_device_cannot_decode_is_read_as_the_workers_read_it(tmp_path):
    root = write_image_tree(tmp_path)
    truncated = root / "train" / "dog" / "0.jpg"
    truncated.write_bytes(truncated.read_bytes()[:2000])  # its header still opens; its pixels do not
    (by_workers, _), (by_device, _) = decoded_both_ways(root)
    torch.testing.assert_close(batch_of_everything(by_device), batch_of_everything(by_workers), rtol=0, atol=0)
    for dataset in (by_device, by_workers):
        assert [dataset.source.describe(i) for i in dataset.unreadable.nonzero().flatten().tolist()] == [str(truncated)]


@pytest.mark.parametrize("decoder", ["torchvision"], indirect=True)
def test_decoding_on_the_device_with_no_jpeg_decoder_is_one_clear_error(tmp_path, monkeypatch, decoder):
    monkeypatch.delattr("torchvision.io.decode_jpeg")  # as in a torchvision that has dropped its decoders
    with pytest.raises(UsageError, match=r"pip install 'alexnet-mp\[device-decode\]'"):
        build_datasets(DataSpec(str(write_image_tree(tmp_path)), decode_on="device"), seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize(("on_device", "workers"), [("device", 0), ("device-in-workers", 2)])
def test_nvjpeg_decodes_to_what_the_workers_decode_within_a_level(tmp_path, on_device, workers):
    root = write_image_tree(tmp_path)
    for path in root.rglob("*.jpg"):  # full-resolution chroma: nvJPEG upsamples 4:2:0 chroma unlike libjpeg-turbo
        Image.open(path).convert("RGB").save(path, quality=95, subsampling=0)
    (by_workers, _), (by_device, _) = decoded_both_ways(root, on_device)
    # then the pixels decode alike and only resizing in float on the GPU rounds differently: a fraction of a
    # level of 255 on average; a wrong crop, flip or channel order is tens of levels
    levels = (batch_of_everything(by_device, "cuda", workers).cpu() - batch_of_everything(by_workers)) * torch.tensor(
        STD).view(3, 1, 1) * 255
    assert levels.abs().mean() < 1


@pytest.mark.slow
def test_a_process_that_ends_with_a_live_loader_ends_with_its_workers():
    """Its loader is still open at exit (a run that failed mid-epoch keeps it in the failure's traceback):
    Python's exit ends the workers with SIGTERM and waits for them. Workers that ignored it, to outlive a
    Ctrl-C, would keep the process from ending; in sessions of their own they are out of Ctrl-C's reach
    and end on SIGTERM (tests/test_training.py: a stop signal to the run's process group)."""
    program = ("import torch\n"
               "from alexnet_mp.data import GlobalBatches, SyntheticImages, rank_batches\n"
               "batches = rank_batches(SyntheticImages(2, 8), GlobalBatches(8, 2, seed=0), slice(0, 2), slice(0, 2),"
               " 0, 4, 1, torch.device('cpu'))\n"
               "next(batches)\n")
    done = subprocess.run([sys.executable, "-c", program], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]


def test_hidden_files_beside_the_images_are_not_images(tmp_path):
    """As a folder copied from a Mac has: `._NAME.jpg`, AppleDouble metadata, beside each image."""
    root = write_image_tree(tmp_path)
    for image in list(root.glob("*/*/*")):
        (image.parent / f"._{image.name}").write_bytes(b"\x00\x05\x16\x07 Mac OS X metadata")
    train, val = build_datasets(DataSpec(str(root)), seed=0)
    assert len(train) == len(val) == 3 * len(CLASSES)
    assert not any(Path(train.source.path(i)).name.startswith(".") for i in range(len(train)))


def test_an_image_folder_keeps_its_file_list_in_arrays_that_forked_workers_share(tmp_path):
    """Not in lists of Python objects, whose reference counts a worker writes as it reads them: that copies
    the list's pages into every worker, 250 MB each for ImageNet's 1.28M files."""
    train, _ = build_datasets(DataSpec(str(write_image_tree(tmp_path))), seed=0)
    source = train.source
    assert isinstance(source.files, np.ndarray) and source.files.dtype.kind == "S"
    assert isinstance(source.targets, np.ndarray) and source.targets.dtype == np.int64
    assert all(Path(source.path(i)).parent.name == CLASSES[source.targets[i]] for i in range(len(train)))
