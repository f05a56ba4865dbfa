"""Dataset loaders: Fashion-MNIST (IDX files) and CIFAR-10 (python batches).

Nothing is downloaded. Fashion-MNIST is read from, in this order of precedence, the `root`
argument, the directory in the environment variable ``PURSAMERE_FASHION_MNIST``, or Debian's
``/usr/share/datasets/fashion-mnist`` (package ``dataset-fashion-mnist``). The first of these
that is given is the one used: an explicit directory that lacks the files is an error rather
than a silent fall-back to other files.

`fashion_mnist_data` and `cifar10_data` give the evaluation images of the adaptive-evaluation
protocol (docs/protocol.md) as tensors: the test set, or the validation split (the last
`holdout` training images, which `train-score --holdout` and `train-classifier --holdout`
keep out of training).

CIFAR-10's python batches are pickles. They are read with a restricted unpickler that can
build only numpy arrays and dtypes (besides the builtin containers, strings and numbers a
pickle encodes without globals, and the latin-1 encoding by which Python 3 stores bytes in
protocol-2 pickles); any other global in the file raises ``ValueError``, so a
tampered file cannot run code.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import zlib
from pathlib import Path

import numpy as np

from . import checks

FASHION_MNIST_ENV = "PURSAMERE_FASHION_MNIST"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")

_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}

# IDX type codes (third magic byte) -> big-endian numpy dtypes.
_IDX_DTYPES = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzip-compressed when its name ends in ``.gz``).

    Args:
        path: the file.

    Returns:
        The array, with the dims and dtype its header declares (native byte order).

    Raises:
        ValueError: naming the file, when the gzip stream is corrupt, the magic number is
            not an IDX one, or the payload is shorter or longer than the header's dims.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except (OSError, EOFError, zlib.error) as e:
        raise ValueError(f"cannot read IDX file {path}: {e}") from e
    if len(raw) < 4:
        raise ValueError(f"IDX file {path} is truncated: {len(raw)} bytes, no header")
    zero0, zero1, code, ndim = raw[0], raw[1], raw[2], raw[3]
    if zero0 != 0 or zero1 != 0 or code not in _IDX_DTYPES or ndim == 0:
        raise ValueError(f"IDX file {path} has a bad magic number 0x{raw[:4].hex()}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"IDX file {path} is truncated inside its header ({len(raw)} bytes)")
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    dtype = _IDX_DTYPES[code]
    # Python ints: a numpy product of absurd dims (2**31 each) wraps around and could
    # match the payload's length.
    expected = math.prod(dims) * dtype.itemsize
    got = len(raw) - header
    if got != expected:
        kind = "truncated" if got < expected else "longer than its header says"
        raise ValueError(f"IDX file {path} is {kind}: dims {dims} need {expected} data bytes, "
                         f"found {got}")
    data = np.frombuffer(raw, dtype=dtype, offset=header).reshape(dims)
    return data.astype(dtype.newbyteorder("="))


def _find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (directory / name).is_file():
            return directory / name
    return None


def fashion_mnist_dir(root: str | os.PathLike | None = None) -> Path:
    """The directory Fashion-MNIST is read from (see the module docstring for the order).

    Args:
        root: an explicit directory, or None.

    Returns:
        The directory.
    """
    if root is not None:
        return Path(root)
    env = os.environ.get(FASHION_MNIST_ENV)
    if env:
        return Path(env)
    return DEBIAN_FASHION_MNIST


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Load Fashion-MNIST from its standard IDX files (``.gz`` or uncompressed).

    Args:
        split: "train" (60,000 images) or "test" (10,000 images).
        root: directory holding the files; None looks at ``$PURSAMERE_FASHION_MNIST``,
            then ``/usr/share/datasets/fashion-mnist``.

    Returns:
        (images, labels): float32 (N, 1, 28, 28) in [0, 1] and int64 (N,) in 0..9.

    Raises:
        ValueError: bad `split`; files not found (the message says how to get them); a
            corrupt, truncated or inconsistent file (the message names it).
    """
    if split not in _FASHION_FILES:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = fashion_mnist_dir(root)
    img_stem, lbl_stem = _FASHION_FILES[split]
    img_path, lbl_path = _find_idx(directory, img_stem), _find_idx(directory, lbl_stem)
    if img_path is None or lbl_path is None:
        missing = [s + "[.gz]" for s, p in ((img_stem, img_path), (lbl_stem, lbl_path)) if p is None]
        raise ValueError(
            f"Fashion-MNIST {split} files not found in {directory} (missing {', '.join(missing)}). "
            f"On Debian/Ubuntu run `apt-get install dataset-fashion-mnist` (installs them in "
            f"{DEBIAN_FASHION_MNIST}); otherwise put the four IDX files from "
            f"https://github.com/zalandoresearch/fashion-mnist in a directory and pass it as "
            f"`root` or set {FASHION_MNIST_ENV}.")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
        raise ValueError(f"{img_path} holds {images.dtype} {images.shape}, expected uint8 (N, 28, 28)")
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise ValueError(f"{lbl_path} holds {labels.dtype} {labels.shape}, expected uint8 (N,)")
    if len(images) != len(labels):
        raise ValueError(f"{img_path} has {len(images)} images but {lbl_path} has {len(labels)} labels")
    if labels.size and labels.max() > 9:
        raise ValueError(f"{lbl_path} holds label {int(labels.max())}, expected 0..9")
    return (images[:, None].astype(np.float32) / 255.0), labels.astype(np.int64)


# The one function numpy pickles every ndarray through; taken from numpy itself so that
# both numpy 1 ("numpy.core.multiarray") and numpy 2 ("numpy._core.multiarray") files load.
_NP_RECONSTRUCT = np.empty(0).__reduce__()[0]
def _latin1_encode(text: str, encoding: str = "utf-8") -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(text, "latin1");
    # only that codec is let through.
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


_ALLOWED_GLOBALS = {
    ("_codecs", "encode"): _latin1_encode,
    ("numpy.core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _NP_RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed") from None


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with open(path, "rb") as f:
            # encoding="bytes": the official batches were pickled by Python 2.
            batch = _ArrayOnlyUnpickler(f, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, OSError) as e:
        raise ValueError(f"cannot read CIFAR-10 batch {path}: {type(e).__name__}: {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise ValueError(f"CIFAR-10 batch {path} is not a dict with b'data' and b'labels'")
    data, labels = batch[b"data"], batch[b"labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
        desc = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ValueError(f"CIFAR-10 batch {path}: b'data' is {desc}, expected uint8 (N, 3072)")
    if not isinstance(labels, (list, tuple)) and not (isinstance(labels, np.ndarray) and labels.ndim == 1):
        raise ValueError(f"CIFAR-10 batch {path}: b'labels' is {type(labels).__name__}, expected a list of ints")
    if len(labels) != data.shape[0]:
        raise ValueError(f"CIFAR-10 batch {path}: {data.shape[0]} images but {len(labels)} labels")
    # Each label on its own: converting the list to int64 first would truncate 1.7 to 1
    # and turn True into 1.
    for i, label in enumerate(labels):
        checks.integer(f"CIFAR-10 batch {path}: label {i}", label, 0, 9)
    return data, np.array(labels, dtype=np.int64)


def load_cifar10(root: str | os.PathLike, split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """Load CIFAR-10 from the standard python batches (``data_batch_1..5``, ``test_batch``).

    The batches are pickles; they are read with an unpickler that only builds numpy arrays
    and dtypes and refuses every other global (see the module docstring).

    Args:
        root: the ``cifar-10-batches-py`` directory, or a directory that contains it.
        split: "train" (data_batch_1..5) or "test" (test_batch).

    Returns:
        (images, labels): float32 (N, 3, 32, 32) in [0, 1] and int64 (N,) in 0..9.

    Raises:
        ValueError: bad `split`, missing files, or a batch that is corrupt, truncated, holds a
            disallowed object, or has the wrong layout (the message names the file).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    directory = Path(root)
    if (directory / "cifar-10-batches-py").is_dir():
        directory = directory / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    missing = [n for n in names if not (directory / n).is_file()]
    if missing:
        raise ValueError(f"CIFAR-10 {split} batches not found in {directory} (missing {', '.join(missing)}); "
                         f"extract cifar-10-python.tar.gz there and pass its directory as `root`")
    parts = [_read_cifar_batch(directory / n) for n in names]
    data = np.concatenate([p[0] for p in parts])
    labels = np.concatenate([p[1] for p in parts])
    images = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels


PARTS = ("validation", "test")


def holdout_split(images, labels, holdout: int):
    """The one rule of the validation split: the last `holdout` training images are held out.

    Every trainer's --holdout, `evaluate`'s part = "validation" data, `attacks.sweep.validation_split`
    and `score-quality --split validation` take their images through it.

    Args:
        images, labels: the training set (arrays or tensors of the same length).
        holdout: images held out, 0..len(images); 0 passes the arrays on untouched.

    Returns:
        ((train images, labels), (held-out images, labels)), in file order.

    Raises:
        ValueError: holdout out of range.
    """
    n = len(images)
    k = checks.integer("holdout", holdout, 0, n)
    if k == 0:
        return (images, labels), (images[n:], labels[n:])
    return (images[:n - k], labels[:n - k]), (images[n - k:], labels[n - k:])


def _part(load, part: str, holdout: int):
    """(images, labels) tensors of `part`: the test split, or the last `holdout` training images."""
    import torch

    checks.choice("part", part, PARTS)
    images, labels = load("test" if part == "test" else "train")
    if part == "validation":
        holdout = checks.integer("holdout", holdout, 1, len(images))
        _, (images, labels) = holdout_split(images, labels, holdout)
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.copy())


def fashion_mnist_data(root: str | os.PathLike | None = None, part: str = "test", holdout: int = 5000):
    """Fashion-MNIST images for `evaluate --data`: the test set, or the validation split.

    Args:
        root: as for `load_fashion_mnist`.
        part: "test" (the 10,000 test images) or "validation": the last `holdout` training
            images (`attacks.sweep.validation_split(holdout)`'s).
        holdout: size of the validation split (part "validation" only).

    Returns:
        (images float32 (N, 1, 28, 28) in [0, 1], labels int64 (N,)) tensors, in file order.

    Raises:
        ValueError: bad part or holdout, or the loader's errors.
    """
    return _part(lambda split: load_fashion_mnist(split, root), part, holdout)


def cifar10_data(root: str | os.PathLike, part: str = "test", holdout: int = 5000):
    """CIFAR-10 images for `evaluate --data`: the test batch, or the validation split.

    Args:
        root: the CIFAR-10 directory (see `load_cifar10`).
        part: "test" (the test batch) or "validation": the last `holdout` training images.
        holdout: size of the validation split (part "validation" only).

    Returns:
        (images float32 (N, 3, 32, 32) in [0, 1], labels int64 (N,)) tensors, in file order.

    Raises:
        ValueError: bad part or holdout, or the loader's errors.
    """
    return _part(lambda split: load_cifar10(root, split), part, holdout)


def save_fashion_mnist_subset(path: str | os.PathLike, n: int = 1000, split: str = "test",
                              root: str | os.PathLike | None = None) -> None:
    """Write the first `n` images of a Fashion-MNIST split as safetensors: "images" uint8
    (n, 1, 28, 28) and "labels" int64 (n,). The package ships the first 1,000 test images so.

    Args:
        path: the file to write.
        n: how many images, from the start of the split.
        split, root: as for `load_fashion_mnist`.

    Raises:
        ValueError: n outside 1..len(split), or as `load_fashion_mnist`.
    """
    import torch
    from safetensors.torch import save_file

    images, labels = load_fashion_mnist(split, root)
    if not 1 <= n <= len(images):
        raise ValueError(f"n must be in 1..{len(images)}, got {n}")
    images_u8 = np.rint(images[:n] * 255).astype(np.uint8)
    save_file({"images": torch.from_numpy(images_u8), "labels": torch.from_numpy(labels[:n].copy())},
              os.fspath(path), metadata={"source": f"Fashion-MNIST {split} split, first {n} images",
                                         "license": "MIT, Copyright (c) 2017 Zalando SE"})
