"""Fashion-MNIST with a small CNN, split across clients i.i.d. or non-i.i.d.

The data are the four IDX files of Zalando's Fashion-MNIST (60,000 training and 10,000 test
images of 28 × 28 grey pixels, 10 classes), read from a local directory; nothing is
downloaded. The directory is, in order of precedence: the ``data_dir`` option, the
``FEDSQUEEZE_FMNIST_DIR`` environment variable, ``/usr/share/datasets/fashion-mnist`` (where
Debian's ``dataset-fashion-mnist`` package puts them).

Partitioning uses flwr-datasets over a local ``datasets.Dataset`` holding each training
example's label and index:

* ``"dirichlet"`` (default): for each class k a proportion vector q_k ~ Dir(α·1_N) is drawn
  and class k's examples are split across the N clients in proportions q_k
  (``DirichletPartitioner``). Small α gives strong label skew; α → ∞ tends to i.i.d.
* ``"iid"``: the examples are shuffled with the seed and cut into N equal shards
  (``IidPartitioner``).

Decoded arrays and partition assignments are cached per process, so the 20 clients of a
simulation that share one worker process read and split the files once; the assignments
are also kept on disk (``$FEDSQUEEZE_CACHE_DIR``, default ``$FEDSQUEEZE_HOME/cache``) so the
next worker process or run with the same settings skips the partitioning.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import struct
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from tasks.base import Task

DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"
DATA_DIR_ENV = "FEDSQUEEZE_FMNIST_DIR"
CACHE_DIR_ENV = "FEDSQUEEZE_CACHE_DIR"

TRAIN_IMAGES = "train-images-idx3-ubyte.gz"
TRAIN_LABELS = "train-labels-idx1-ubyte.gz"
TEST_IMAGES = "t10k-images-idx3-ubyte.gz"
TEST_LABELS = "t10k-labels-idx1-ubyte.gz"
FILES = (TRAIN_IMAGES, TRAIN_LABELS, TEST_IMAGES, TEST_LABELS)

NUM_CLASSES = 10
CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
#: mean and standard deviation of the training pixels scaled to [0, 1]
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530

PARTITIONINGS = ("dirichlet", "iid")

_IDX_IMAGES_MAGIC = 0x00000803  # unsigned byte, 3 dimensions
_IDX_LABELS_MAGIC = 0x00000801  # unsigned byte, 1 dimension


class FashionMnistDataMissing(FileNotFoundError):
    """The Fashion-MNIST IDX files are not where the task looks for them."""


def resolve_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """The data directory: `data_dir`, else $FEDSQUEEZE_FMNIST_DIR, else the Debian path."""
    if data_dir is not None and str(data_dir) != "":
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_DIR_ENV, "")
    return Path(env).expanduser() if env else Path(DEFAULT_DATA_DIR)


def _missing_message(directory: Path, missing: list[str]) -> str:
    return (
        f"Fashion-MNIST data not found: {', '.join(missing)} missing in {directory}. "
        f"Get the files with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu, "
        f"installs them under {DEFAULT_DATA_DIR}), or copy the four IDX files "
        f"({', '.join(FILES)}) into a directory and point the task at it with the "
        f"data_dir option or the {DATA_DIR_ENV} environment variable."
    )


def check_data_dir(data_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the resolved data directory; raise `FashionMnistDataMissing` naming what lacks."""
    directory = resolve_data_dir(data_dir)
    missing = [name for name in FILES if not (directory / name).is_file()]
    if missing:
        raise FashionMnistDataMissing(_missing_message(directory, missing))
    return directory


def data_available(data_dir: str | os.PathLike[str] | None = None) -> bool:
    """True when all four IDX files are present."""
    try:
        check_data_dir(data_dir)
    except FashionMnistDataMissing:
        return False
    return True


def read_idx(path: Path, expected_magic: int) -> np.ndarray:
    """Decode one gzipped IDX file of unsigned bytes into an array of its stated shape.

    IDX layout: a big-endian int32 magic (0x0000 08 D: dtype 0x08 = uint8, D dimensions),
    D big-endian int32 sizes, then the prod(sizes) bytes of data.
    """
    try:
        with gzip.open(path, "rb") as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f"{path}: cannot read a gzipped IDX file: {exc}") from exc
    if len(raw) < 4:
        raise ValueError(f"{path}: too short for an IDX header ({len(raw)} bytes)")
    (magic,) = struct.unpack(">i", raw[:4])
    if magic != expected_magic:
        raise ValueError(f"{path}: IDX magic number {magic:#010x}, expected {expected_magic:#010x}")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}i", raw[4:header])
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(
            f"{path}: IDX header announces shape {shape} ({size} bytes) but the file holds "
            f"{len(raw) - header} bytes of data"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


@dataclass(frozen=True)
class FashionMnistArrays:
    """The decoded dataset: images (n, 28, 28) uint8, labels (n,) int64."""

    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray


_cache_lock = threading.Lock()
_array_cache: dict[Path, FashionMnistArrays] = {}
_partition_cache: dict[tuple[Path, int, str, float, int, int], list[np.ndarray]] = {}


def load_arrays(data_dir: str | os.PathLike[str] | None = None) -> FashionMnistArrays:
    """Decode the four IDX files once per process and directory."""
    directory = check_data_dir(data_dir).resolve()
    with _cache_lock:
        cached = _array_cache.get(directory)
        if cached is not None:
            return cached
        arrays = FashionMnistArrays(
            train_images=read_idx(directory / TRAIN_IMAGES, _IDX_IMAGES_MAGIC),
            train_labels=read_idx(directory / TRAIN_LABELS, _IDX_LABELS_MAGIC).astype(np.int64),
            test_images=read_idx(directory / TEST_IMAGES, _IDX_IMAGES_MAGIC),
            test_labels=read_idx(directory / TEST_LABELS, _IDX_LABELS_MAGIC).astype(np.int64),
        )
        for split, images, labels in (
            ("train", arrays.train_images, arrays.train_labels),
            ("test", arrays.test_images, arrays.test_labels),
        ):
            if images.shape[0] != labels.shape[0] or images.shape[1:] != (28, 28):
                raise ValueError(
                    f"{directory}: {split} images {images.shape} do not match labels "
                    f"{labels.shape} (expected (n, 28, 28) and (n,))"
                )
            if labels.size and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
                raise ValueError(f"{directory}: {split} labels outside 0..{NUM_CLASSES - 1}")
        _array_cache[directory] = arrays
        return arrays


def partition_indices(
    labels: np.ndarray,
    num_partitions: int,
    partitioning: str = "dirichlet",
    alpha: float = 0.5,
    seed: int = 0,
    min_partition_size: int = 10,
) -> list[np.ndarray]:
    """Training-example indices of each of `num_partitions` clients (flwr-datasets).

    Builds a ``datasets.Dataset`` with columns ``label`` and ``index`` and lets
    ``DirichletPartitioner`` (label skew q_k ~ Dir(α), resampled until every client holds at
    least `min_partition_size` examples) or ``IidPartitioner`` (after a seeded shuffle) cut
    it. The partitions are disjoint and together cover every example.
    """
    from datasets import Dataset as HFDataset
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner

    if partitioning not in PARTITIONINGS:
        raise ValueError(
            f"unknown partitioning {partitioning!r}: use one of {', '.join(PARTITIONINGS)}"
        )
    if num_partitions < 1:
        raise ValueError(f"num_partitions must be >= 1, got {num_partitions}")
    if num_partitions * max(min_partition_size, 1) > labels.shape[0]:
        raise ValueError(
            f"{num_partitions} partitions of at least {max(min_partition_size, 1)} examples "
            f"need more than the {labels.shape[0]} training examples"
        )
    if not alpha > 0 or not np.isfinite(alpha):
        raise ValueError(f"alpha must be a positive number, got {alpha}")
    dataset = HFDataset.from_dict(
        {"label": labels.astype(np.int64), "index": np.arange(labels.shape[0], dtype=np.int64)}
    )
    partitioner: Partitioner
    if partitioning == "dirichlet":
        partitioner = DirichletPartitioner(
            num_partitions=num_partitions,
            partition_by="label",
            alpha=float(alpha),
            min_partition_size=min_partition_size,
            self_balancing=False,
            shuffle=True,
            seed=seed,
        )
    else:
        dataset = dataset.shuffle(seed=seed)
        partitioner = IidPartitioner(num_partitions=num_partitions)
    partitioner.dataset = dataset
    return [
        np.asarray(partitioner.load_partition(pid)["index"], dtype=np.int64)
        for pid in range(num_partitions)
    ]


def _to_tensor_dataset(images: np.ndarray, labels: np.ndarray) -> TensorDataset:
    """Scale pixels to [0, 1], standardise, and add the channel axis: (n, 1, 28, 28)."""
    x = torch.from_numpy(images.astype(np.float32) / 255.0)
    x = (x - PIXEL_MEAN) / PIXEL_STD
    return TensorDataset(x.unsqueeze(1).contiguous(), torch.from_numpy(labels.copy()))


class FashionCNN(nn.Module):
    """Two 5×5 convolutions with max-pooling, then two fully connected layers.

    (1, 28, 28) → conv 8 → ReLU → pool 2 → (8, 12, 12) → conv 16 → ReLU → pool 2
    → (16, 4, 4) → fc 256→64 → ReLU → fc 64→10 logits; 20,522 parameters.
    """

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 8, kernel_size=5)
        self.conv2 = nn.Conv2d(8, 16, kernel_size=5)
        self.fc1 = nn.Linear(16 * 4 * 4, 64)
        self.fc2 = nn.Linear(64, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc2(F.relu(self.fc1(x)))


def default_cache_dir() -> Path | None:
    """$FEDSQUEEZE_CACHE_DIR, else $FEDSQUEEZE_HOME/cache, else ~/.fedsqueeze/cache.

    Setting FEDSQUEEZE_CACHE_DIR to an empty string turns the disk cache off.
    """
    env = os.environ.get(CACHE_DIR_ENV)
    if env is not None:
        return Path(env).expanduser() if env else None
    home = os.environ.get("FEDSQUEEZE_HOME") or "~/.fedsqueeze"
    return Path(home).expanduser() / "cache" / "fashion-mnist"


def _read_partition_file(
    path: Path | None, num_partitions: int, num_examples: int
) -> list[np.ndarray] | None:
    """The cached assignment, or None when absent or not a valid one (then recomputed)."""
    if path is None or not path.is_file():
        return None
    try:
        with np.load(path) as data:
            indices, offsets = data["indices"], data["offsets"]
    except (OSError, ValueError, KeyError):
        return None
    if (
        offsets.shape != (num_partitions + 1,)
        or offsets[0] != 0
        or offsets[-1] != indices.shape[0]
        or np.any(np.diff(offsets) < 0)
        or indices.shape[0] != num_examples
        or np.unique(indices).shape[0] != num_examples
    ):
        return None
    return [indices[offsets[i] : offsets[i + 1]].astype(np.int64) for i in range(num_partitions)]


def _write_partition_file(path: Path | None, parts: list[np.ndarray]) -> None:
    """Write atomically (temp file + rename); a cache that cannot be written is skipped."""
    if path is None:
        return
    offsets = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
    tmp: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as fh:
            np.savez(fh, indices=np.concatenate(parts).astype(np.int64), offsets=offsets)
        os.replace(tmp, path)
    except OSError:
        if tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)


class FashionMnistTask(Task):
    """Fashion-MNIST classification with `FashionCNN`, loss = mean cross-entropy."""

    name = "fashion-mnist"
    full_batch = False
    classification = True

    def __init__(
        self,
        num_partitions: int = 20,
        seed: int = 0,
        data_dir: str | os.PathLike[str] | None = None,
        partitioning: str = "dirichlet",
        alpha: float = 0.5,
        min_partition_size: int = 10,
        test_examples: int = 0,
        cache_dir: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(num_partitions=num_partitions, seed=seed)
        if partitioning not in PARTITIONINGS:
            raise ValueError(
                f"unknown partitioning {partitioning!r}: use one of {', '.join(PARTITIONINGS)}"
            )
        if not float(alpha) > 0:
            raise ValueError(f"alpha must be a positive number, got {alpha}")
        if test_examples < 0:
            raise ValueError(f"test_examples must be >= 0 (0 = all), got {test_examples}")
        # fail early, with the message that says how to get the data
        self.data_dir = check_data_dir(data_dir)
        self.partitioning = partitioning
        self.alpha = float(alpha)
        self.min_partition_size = int(min_partition_size)
        self.test_examples = int(test_examples)
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()

    def make_model(self) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return FashionCNN()

    def partitions(self) -> list[np.ndarray]:
        """Training indices of every client (computed once per process and settings)."""
        arrays = load_arrays(self.data_dir)
        key = (
            self.data_dir.resolve(),
            self.num_partitions,
            self.partitioning,
            self.alpha,
            self.seed,
            self.min_partition_size,
        )
        with _cache_lock:
            cached = _partition_cache.get(key)
        if cached is not None:
            return cached
        disk = self._disk_cache_path()
        parts = _read_partition_file(disk, self.num_partitions, arrays.train_labels.shape[0])
        if parts is None:
            parts = partition_indices(
                arrays.train_labels,
                self.num_partitions,
                partitioning=self.partitioning,
                alpha=self.alpha,
                seed=self.seed,
                min_partition_size=self.min_partition_size,
            )
            _write_partition_file(disk, parts)
        with _cache_lock:
            return _partition_cache.setdefault(key, parts)

    def _disk_cache_path(self) -> Path | None:
        """Where the partition assignment is kept between processes (None: no disk cache).

        Every simulated client process would otherwise repeat the Dirichlet partitioning
        (seconds each); the file is keyed by the settings and by the IDX files' size and
        modification time, so new data or other settings never reuse a stale assignment.
        """
        if self.cache_dir is None:
            return None
        labels = (self.data_dir / TRAIN_LABELS).stat()
        signature = "|".join(
            (
                str(self.data_dir.resolve()),
                f"{labels.st_size}:{labels.st_mtime_ns}",
                str(self.num_partitions),
                self.partitioning,
                repr(self.alpha),
                str(self.seed),
                str(self.min_partition_size),
            )
        )
        digest = hashlib.sha256(signature.encode()).hexdigest()[:24]
        return self.cache_dir / f"partitions-{digest}.npz"

    def load_partition(self, partition_id: int) -> Dataset[Any]:
        self.check_partition_id(partition_id)
        arrays = load_arrays(self.data_dir)
        idx = self.partitions()[partition_id]
        return _to_tensor_dataset(arrays.train_images[idx], arrays.train_labels[idx])

    def load_test(self) -> Dataset[Any]:
        arrays = load_arrays(self.data_dir)
        n = arrays.test_labels.shape[0]
        if self.test_examples:
            n = min(n, self.test_examples)
        return _to_tensor_dataset(arrays.test_images[:n], arrays.test_labels[:n])

    def loss(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(outputs, targets)


def make_task(
    num_partitions: int = 20,
    seed: int = 0,
    data_dir: str | os.PathLike[str] | None = None,
    partitioning: str = "dirichlet",
    alpha: float = 0.5,
    min_partition_size: int = 10,
    test_examples: int = 0,
    cache_dir: str | os.PathLike[str] | None = None,
    **unused: Any,
) -> Task:
    """Build the Fashion-MNIST task (registered as ``"fashion-mnist"``).

    Options: `num_partitions` clients, `seed` (partitioning and initial weights), `data_dir`
    (else $FEDSQUEEZE_FMNIST_DIR, else /usr/share/datasets/fashion-mnist), `partitioning`
    ``"dirichlet"`` (label skew with concentration `alpha`) or ``"iid"``,
    `min_partition_size`, `test_examples` (0 = the whole 10k test set), `cache_dir` (where
    partition assignments are kept between processes; default `default_cache_dir()`).
    Options meant for other tasks are ignored.
    """
    return FashionMnistTask(
        num_partitions=num_partitions,
        seed=seed,
        data_dir=data_dir,
        partitioning=partitioning,
        alpha=alpha,
        min_partition_size=min_partition_size,
        test_examples=test_examples,
        cache_dir=cache_dir,
    )
