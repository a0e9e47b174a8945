"""Fashion-MNIST task: real IDX files, partitioning, model, errors."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Sized
from pathlib import Path
from typing import Any, cast

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from tasks import fashion_mnist, load_task
from tasks.fashion_mnist import (
    CACHE_DIR_ENV,
    DATA_DIR_ENV,
    FILES,
    TRAIN_LABELS,
    FashionMnistArrays,
    FashionMnistDataMissing,
    FashionMnistTask,
    data_available,
    load_arrays,
    partition_indices,
    resolve_data_dir,
)

pytestmark = pytest.mark.skipif(
    not data_available(),
    reason="Fashion-MNIST IDX files missing: apt-get install dataset-fashion-mnist",
)


@pytest.fixture(autouse=True)
def _own_cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def arrays() -> FashionMnistArrays:
    return load_arrays()


def _size(dataset: Any) -> int:
    return len(cast(Sized, dataset))


def _label_histograms(labels: np.ndarray, parts: list[np.ndarray]) -> np.ndarray:
    return np.stack([np.bincount(labels[p], minlength=10) / len(p) for p in parts])


def test_arrays_have_the_published_shapes(arrays: FashionMnistArrays) -> None:
    assert arrays.train_images.shape == (60000, 28, 28)
    assert arrays.train_labels.shape == (60000,)
    assert arrays.test_images.shape == (10000, 28, 28)
    assert arrays.test_labels.shape == (10000,)
    assert arrays.train_images.dtype == np.uint8
    # Fashion-MNIST is balanced: 6,000 training and 1,000 test images per class
    assert np.bincount(arrays.train_labels).tolist() == [6000] * 10
    assert np.bincount(arrays.test_labels).tolist() == [1000] * 10
    assert load_arrays() is arrays  # decoded once per process


def test_dirichlet_partitions_cover_everything_once(arrays: FashionMnistArrays) -> None:
    task = FashionMnistTask(num_partitions=20, seed=3, alpha=0.5)
    parts = task.partitions()
    assert len(parts) == 20
    assert sum(len(p) for p in parts) == 60000
    everything = np.concatenate(parts)
    assert np.unique(everything).size == 60000
    assert min(len(p) for p in parts) >= 10
    # the datasets the clients get are those indices, in the model's input layout
    ds = task.load_partition(7)
    assert _size(ds) == len(parts[7])
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == torch.float32
    assert int(y) == int(arrays.train_labels[parts[7][0]])


def test_dirichlet_is_label_skewed_and_iid_is_not(arrays: FashionMnistArrays) -> None:
    labels = arrays.train_labels
    global_hist = np.full(10, 0.1)
    skewed = partition_indices(labels, 10, "dirichlet", alpha=0.1, seed=0)
    iid = partition_indices(labels, 10, "iid", seed=0)
    tv_skewed = 0.5 * np.abs(_label_histograms(labels, skewed) - global_hist).sum(axis=1)
    tv_iid = 0.5 * np.abs(_label_histograms(labels, iid) - global_hist).sum(axis=1)
    # alpha = 0.1: most clients see a few classes only; iid shards match the global mix
    assert tv_skewed.mean() > 0.4, tv_skewed
    assert tv_iid.max() < 0.05, tv_iid
    assert [len(p) for p in iid] == [6000] * 10
    assert np.unique(np.concatenate(iid)).size == 60000


def test_partitions_are_deterministic_from_the_seed(arrays: FashionMnistArrays) -> None:
    labels = arrays.train_labels[:12000]  # a real subset keeps this test fast
    for partitioning in ("dirichlet", "iid"):
        a = partition_indices(labels, 5, partitioning, alpha=0.3, seed=11)
        b = partition_indices(labels, 5, partitioning, alpha=0.3, seed=11)
        c = partition_indices(labels, 5, partitioning, alpha=0.3, seed=12)
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
        assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_model_is_small_and_seeded() -> None:
    task = load_task("fashion-mnist", num_partitions=4, seed=5)
    model = task.make_model()
    n_params = sum(p.numel() for p in model.parameters())
    assert 10_000 <= n_params <= 50_000
    out = model(torch.zeros(3, 1, 28, 28))
    assert out.shape == (3, 10)
    same = task.make_model()
    other = load_task("fashion-mnist", num_partitions=4, seed=6).make_model()
    for p, q, _r in zip(model.parameters(), same.parameters(), other.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not all(
        torch.equal(p, r) for p, r in zip(model.parameters(), other.parameters(), strict=True)
    )


def test_a_client_learns_from_its_partition() -> None:
    """60 SGD steps on one i.i.d. shard beat chance by far on the test set."""
    torch.manual_seed(0)
    task = load_task(
        "fashion-mnist", num_partitions=20, seed=0, partitioning="iid", test_examples=2000
    )
    model = task.make_model()
    before = task.evaluate(model, task.load_test(), torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loader = DataLoader(task.load_partition(0), batch_size=32, shuffle=True)
    model.train()
    for step, (inputs, targets) in enumerate(loader):
        if step == 60:
            break
        opt.zero_grad()
        task.loss(model(inputs), targets).backward()
        opt.step()
    after = task.evaluate(model, task.load_test(), torch.device("cpu"))
    assert before["accuracy"] < 0.2
    assert after["accuracy"] > 0.6, after
    assert after["loss"] < before["loss"]


def test_test_examples_limits_the_central_set() -> None:
    task = load_task("fashion-mnist", num_partitions=2, test_examples=500)
    assert _size(task.load_test()) == 500
    assert _size(load_task("fashion-mnist", num_partitions=2).load_test()) == 10000


def test_missing_directory_says_how_to_get_the_data(tmp_path: Path) -> None:
    with pytest.raises(FashionMnistDataMissing) as info:
        load_task("fashion-mnist", data_dir=tmp_path / "nowhere")
    message = str(info.value)
    assert "train-images-idx3-ubyte.gz" in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert DATA_DIR_ENV in message


def test_env_variable_selects_the_directory_and_one_missing_file_is_named(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    source = resolve_data_dir()
    for name in FILES:
        if name != TRAIN_LABELS:
            (tmp_path / name).symlink_to(source / name)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    with pytest.raises(FashionMnistDataMissing) as info:
        load_task("fashion-mnist")
    assert TRAIN_LABELS in str(info.value)
    assert "t10k-labels-idx1-ubyte.gz" not in str(info.value).split("missing")[0]
    shutil.copy(source / TRAIN_LABELS, tmp_path / TRAIN_LABELS)
    task = load_task("fashion-mnist", num_partitions=3)
    assert isinstance(task, FashionMnistTask)
    assert sum(len(p) for p in task.partitions()) == 60000


def test_corrupt_file_is_reported(tmp_path: Path) -> None:
    source = resolve_data_dir()
    for name in FILES:
        (tmp_path / name).symlink_to(source / name)
    (tmp_path / TRAIN_LABELS).unlink()
    with gzip.open(tmp_path / TRAIN_LABELS, "wb") as fh:
        fh.write(b"\x00\x00\x08\x03" + b"\x00" * 12)  # an images header in a labels file
    with pytest.raises(ValueError, match="magic number"):
        load_arrays(tmp_path)


def test_bad_options_are_rejected() -> None:
    with pytest.raises(ValueError, match="partitioning"):
        load_task("fashion-mnist", partitioning="by-writer")
    with pytest.raises(ValueError, match="alpha"):
        load_task("fashion-mnist", alpha=0)
    with pytest.raises(ValueError, match="num_partitions"):
        load_task("fashion-mnist", num_partitions=0)
    task = load_task("fashion-mnist", num_partitions=4)
    with pytest.raises(ValueError, match="out of range"):
        task.load_partition(4)


def test_partitions_are_kept_on_disk_for_the_next_process(tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    first = FashionMnistTask(num_partitions=7, seed=4, alpha=0.3)
    parts = first.partitions()
    files = list(cache.glob("partitions-*.npz"))
    assert len(files) == 1
    fashion_mnist._partition_cache.clear()  # as in a fresh worker process
    again = FashionMnistTask(num_partitions=7, seed=4, alpha=0.3).partitions()
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = FashionMnistTask(num_partitions=7, seed=5, alpha=0.3).partitions()
    assert len(list(cache.glob("partitions-*.npz"))) == 2  # other settings, other file
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))
    # a damaged file is ignored and rewritten, never trusted
    files[0].write_bytes(b"not an npz")
    fashion_mnist._partition_cache.clear()
    rebuilt = FashionMnistTask(num_partitions=7, seed=4, alpha=0.3).partitions()
    assert all(np.array_equal(a, b) for a, b in zip(parts, rebuilt, strict=True))
    assert files[0].stat().st_size > 1000


def test_disk_cache_can_be_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(CACHE_DIR_ENV, "")
    task = FashionMnistTask(num_partitions=3, seed=9)
    assert task.cache_dir is None
    assert sum(len(p) for p in task.partitions()) == 60000
    assert not (tmp_path / "cache").exists()
