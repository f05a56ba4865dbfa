"""Dataset loaders on small synthetic files in the real formats (gz IDX, CIFAR python batches)."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest

from pursamere_fast import data
from pursamere_fast.data import load_cifar10, load_fashion_mnist, read_idx

_CODES = {np.dtype(np.uint8): 0x08, np.dtype(np.int32): 0x0C, np.dtype(np.float32): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, _CODES[array.dtype], array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_fashion(directory, split="train", n=6, seed=0, gz=True):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n, dtype=np.uint8)
    prefix = "train" if split == "train" else "t10k"
    directory.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3-ubyte", images), ("labels-idx1-ubyte", labels)):
        raw = idx_bytes(arr)
        if gz:
            (directory / f"{prefix}-{kind}.gz").write_bytes(gzip.compress(raw))
        else:
            (directory / f"{prefix}-{kind}").write_bytes(raw)
    return images, labels


@pytest.mark.parametrize("split", ["train", "test"])
@pytest.mark.parametrize("gz", [True, False])
def test_fashion_roundtrip(tmp_path, split, gz):
    images, labels = write_fashion(tmp_path, split, n=5, seed=3, gz=gz)
    x, y = load_fashion_mnist(split, tmp_path)
    assert x.shape == (5, 1, 28, 28) and x.dtype == np.float32
    assert y.shape == (5,) and y.dtype == np.int64
    np.testing.assert_array_equal(x[:, 0] * 255, images.astype(np.float32))
    np.testing.assert_array_equal(y, labels)
    assert x.min() >= 0 and x.max() <= 1


def test_fashion_env_var_and_root_precedence(tmp_path, monkeypatch):
    env_images, _ = write_fashion(tmp_path / "env", seed=1)
    root_images, _ = write_fashion(tmp_path / "root", seed=2)
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "env"))
    np.testing.assert_array_equal(load_fashion_mnist("train")[0][:, 0] * 255, env_images)
    np.testing.assert_array_equal(load_fashion_mnist("train", tmp_path / "root")[0][:, 0] * 255, root_images)


def test_fashion_explicit_dir_without_files_does_not_fall_back(tmp_path, monkeypatch):
    write_fashion(tmp_path / "env")
    monkeypatch.setenv(data.FASHION_MNIST_ENV, str(tmp_path / "env"))
    with pytest.raises(ValueError, match="apt-get install dataset-fashion-mnist") as err:
        load_fashion_mnist("train", tmp_path / "empty")
    assert "empty" in str(err.value)


def test_fashion_missing_everywhere_explains(tmp_path, monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(ValueError, match="PURSAMERE_FASHION_MNIST") as err:
        load_fashion_mnist("test")
    assert "t10k-images-idx3-ubyte" in str(err.value)


def test_fashion_bad_split(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist("validation", tmp_path)


def _corrupt(path, how):
    raw = gzip.decompress(path.read_bytes())
    if how == "truncated_payload":
        path.write_bytes(gzip.compress(raw[:-7]))
    elif how == "extra_payload":
        path.write_bytes(gzip.compress(raw + b"\0"))
    elif how == "truncated_gzip":
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])
    elif how == "not_gzip":
        path.write_bytes(b"this is not a gzip stream at all")
    elif how == "bad_magic":
        path.write_bytes(gzip.compress(b"\x01\x02" + raw[2:]))
    elif how == "header_only":
        path.write_bytes(gzip.compress(raw[:6]))
    elif how == "empty":
        path.write_bytes(gzip.compress(b""))


@pytest.mark.parametrize("how", ["truncated_payload", "extra_payload", "truncated_gzip", "not_gzip",
                                 "bad_magic", "header_only", "empty"])
@pytest.mark.parametrize("which", ["images", "labels"])
def test_fashion_corrupt_files_name_the_file(tmp_path, how, which):
    write_fashion(tmp_path)
    name = "train-images-idx3-ubyte.gz" if which == "images" else "train-labels-idx1-ubyte.gz"
    _corrupt(tmp_path / name, how)
    with pytest.raises(ValueError, match=name):
        load_fashion_mnist("train", tmp_path)


def test_fashion_inconsistent_files(tmp_path):
    write_fashion(tmp_path, n=6)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    with pytest.raises(ValueError, match="6 images but .* 5 labels"):
        load_fashion_mnist("train", tmp_path)
    (tmp_path / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.full(6, 10, np.uint8))))
    with pytest.raises(ValueError, match="label 10"):
        load_fashion_mnist("train", tmp_path)
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros((6, 32, 32), np.uint8))))
    with pytest.raises(ValueError, match=r"expected uint8 \(N, 28, 28\)"):
        load_fashion_mnist("train", tmp_path)


@pytest.mark.parametrize("dtype", [np.uint8, np.int32, np.float32])
def test_read_idx_dtypes(tmp_path, dtype):
    arr = ((np.arange(24).reshape(2, 3, 4) - 5).astype(dtype) if dtype != np.uint8
           else np.arange(24, dtype=np.uint8).reshape(2, 3, 4))
    (tmp_path / "a.idx").write_bytes(idx_bytes(arr))
    out = read_idx(tmp_path / "a.idx")
    assert out.dtype == arr.dtype and out.dtype.isnative
    np.testing.assert_array_equal(out, arr)


@pytest.mark.skipif(not data.DEBIAN_FASHION_MNIST.is_dir(),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_fashion_mnist_test_split(monkeypatch):
    monkeypatch.delenv(data.FASHION_MNIST_ENV, raising=False)
    x, y = load_fashion_mnist("test")
    assert x.shape == (10000, 1, 28, 28) and y.shape == (10000,)
    np.testing.assert_array_equal(np.bincount(y), np.full(10, 1000))
    assert x.min() == 0.0 and x.max() == 1.0


# CIFAR-10 python batches -------------------------------------------------------------------


def write_cifar(directory, n=3, seed=0, protocol=2):
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    out = {}
    for i, name in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        batch = {b"batch_label": name.encode(), b"labels": [int(v) for v in rng.integers(0, 10, n)],
                 b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
                 b"filenames": [f"img{i}_{k}.png".encode() for k in range(n)]}
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=protocol)
        out[name] = batch
    return out


@pytest.mark.parametrize("protocol", [2, 4])
def test_cifar_roundtrip(tmp_path, protocol):
    batches = write_cifar(tmp_path / "cifar-10-batches-py", n=3, protocol=protocol)
    x, y = load_cifar10(tmp_path, "train")  # the parent of cifar-10-batches-py works too
    assert x.shape == (15, 3, 32, 32) and x.dtype == np.float32 and y.dtype == np.int64
    first = batches["data_batch_1"][b"data"][1]
    # Row layout: 1024 red, 1024 green, 1024 blue, each row-major 32x32.
    assert x[1, 2, 5, 7] * 255 == pytest.approx(first[2 * 1024 + 5 * 32 + 7])
    np.testing.assert_array_equal(y[3:6], batches["data_batch_2"][b"labels"])
    xt, yt = load_cifar10(tmp_path / "cifar-10-batches-py", "test")
    np.testing.assert_array_equal(xt.reshape(3, -1) * 255, batches["test_batch"][b"data"].astype(np.float32))
    np.testing.assert_array_equal(yt, batches["test_batch"][b"labels"])


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_cifar_refuses_arbitrary_objects(tmp_path):
    write_cifar(tmp_path)
    marker = tmp_path / "pwned"
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil(marker)}, f)
    with pytest.raises(ValueError, match="test_batch.*not allowed"):
        load_cifar10(tmp_path, "test")
    assert not marker.exists()


@pytest.mark.parametrize("how", ["truncated", "garbage", "wrong_shape", "wrong_dtype", "label_count",
                                 "label_range", "not_a_dict"])
def test_cifar_bad_batches_name_the_file(tmp_path, how):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    bad = {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 1]}
    if how == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    elif how == "garbage":
        path.write_bytes(b"\x80\x02garbage")
    else:
        if how == "wrong_shape":
            bad[b"data"] = np.zeros((2, 3000), np.uint8)
        elif how == "wrong_dtype":
            bad[b"data"] = np.zeros((2, 3072), np.float32)
        elif how == "label_count":
            bad[b"labels"] = [0]
        elif how == "label_range":
            bad[b"labels"] = [0, 12]
        elif how == "not_a_dict":
            bad = [1, 2, 3]
        with open(path, "wb") as f:
            pickle.dump(bad, f, protocol=2)
    with pytest.raises(ValueError, match="data_batch_3"):
        load_cifar10(tmp_path, "train")


def test_cifar_missing_and_bad_split(tmp_path):
    write_cifar(tmp_path)
    (tmp_path / "data_batch_4").unlink()
    with pytest.raises(ValueError, match="data_batch_4"):
        load_cifar10(tmp_path, "train")
    with pytest.raises(ValueError, match="split"):
        load_cifar10(tmp_path, "val")


@pytest.mark.parametrize("dims, payload", [
    ((2**31,), 10),               # far more than the file holds
    ((2**31, 2**31, 4), 0),       # product 2**64: wraps to 0 in int64 and would "match" an empty payload
    ((2**32 - 1,) * 4, 16),
])
def test_read_idx_refuses_header_dims_beyond_the_file(tmp_path, dims, payload):
    path = tmp_path / "huge.idx"
    path.write_bytes(bytes([0, 0, 0x08, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + bytes(payload))
    with pytest.raises(ValueError, match="huge.idx is truncated"):
        read_idx(path)


@pytest.mark.parametrize("labels, bad", [
    ([0, 1.7], "1.7"),            # a float would be truncated to 1
    ([0, True], "True"),          # a bool would be cast to 1
    ([0, "3"], "'3'"),
    ([0, 10], "10"),
    ([-1, 0], "-1"),
    (np.array([0.0, 1.0]), "0.0"),
])
def test_cifar_refuses_labels_that_are_not_class_indices(tmp_path, labels, bad):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": labels}, f, protocol=2)
    with pytest.raises(ValueError, match=r"test_batch: label \d must be an integer >= 0 and <= 9, got ") as err:
        load_cifar10(tmp_path, "test")
    assert bad in str(err.value).rsplit(", got ", 1)[1]  # numpy 2 shows np.float64(0.0)


def test_cifar_refuses_labels_that_are_not_a_list(tmp_path):
    write_cifar(tmp_path)
    with open(tmp_path / "test_batch", "wb") as f:
        pickle.dump({b"data": np.zeros((2, 3072), np.uint8), b"labels": b"\x00\x01"}, f, protocol=2)
    with pytest.raises(ValueError, match="test_batch: b'labels' is bytes"):
        load_cifar10(tmp_path, "test")


def test_evaluation_parts_are_the_test_set_or_the_last_training_images(tmp_path):
    train_x, train_y = write_fashion(tmp_path, "train", n=6, seed=1)
    test_x, _ = write_fashion(tmp_path, "test", n=4, seed=2)
    x, y = data.fashion_mnist_data(tmp_path, "validation", holdout=2)
    assert x.dtype.is_floating_point and x.shape == (2, 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0].numpy() * 255, train_x[-2:].astype(np.float32))
    assert y.tolist() == train_y[-2:].tolist()
    assert data.fashion_mnist_data(tmp_path)[0].shape == (4, 1, 28, 28)  # part "test" by default
    batches = write_cifar(tmp_path / "cifar-10-batches-py", n=3)
    x, y = data.cifar10_data(tmp_path, "validation", holdout=3)
    assert x.shape == (3, 3, 32, 32) and y.tolist() == batches["data_batch_5"][b"labels"]
    assert data.cifar10_data(tmp_path, "test")[0].shape == (3, 3, 32, 32)
    with pytest.raises(ValueError, match="^part must"):
        data.cifar10_data(tmp_path, "train")
    with pytest.raises(ValueError, match="^holdout must"):
        data.fashion_mnist_data(tmp_path, "validation", holdout=7)
