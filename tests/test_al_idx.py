"""The IDX reader against hand-made files, and the Fashion-MNIST loader against the Debian package's files."""

import gzip
import os
import struct

import numpy as np
import pytest

from fastdal.al import data, idx


def idx_bytes(array: np.ndarray, code: int) -> bytes:
    """An IDX file written by hand from the format's definition: 0 0 code ndim, big-endian u32 dims, values."""
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.astype(idx.IDX_TYPES[code]).tobytes()


@pytest.mark.parametrize(
    ("code", "values"),
    [
        (0x08, np.arange(24, dtype=np.uint8).reshape(2, 3, 4)),
        (0x09, np.array([-128, -1, 0, 127], dtype=np.int8)),
        (0x0B, np.array([[-300, 2], [3, 32767]], dtype=np.int16)),
        (0x0C, np.array([-(2**31), 1, 2**31 - 1], dtype=np.int32)),
        (0x0D, np.array([1.5, -2.25], dtype=np.float32)),
        (0x0E, np.array([[np.pi]], dtype=np.float64)),
    ],
)
@pytest.mark.parametrize("gzipped", [False, True])
def test_hand_made_idx_files(tmp_path, code, values, gzipped):
    raw = idx_bytes(values, code)
    path = tmp_path / ("a.gz" if gzipped else "a")
    path.write_bytes(gzip.compress(raw) if gzipped else raw)
    read = idx.read_idx(path)
    assert read.shape == values.shape and read.dtype.isnative
    np.testing.assert_array_equal(read, values)


def test_a_gzipped_file_is_told_by_its_content_not_its_name(tmp_path):
    values = np.arange(6, dtype=np.uint8)
    (tmp_path / "plain.gz").write_bytes(idx_bytes(values, 0x08))
    (tmp_path / "packed").write_bytes(gzip.compress(idx_bytes(values, 0x08)))
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "plain.gz"), values)
    np.testing.assert_array_equal(idx.read_idx(tmp_path / "packed"), values)


def test_bad_files_are_refused_with_the_reason(tmp_path):
    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08)
    with pytest.raises(idx.IDXError, match="magic number"):
        idx.parse_idx(b"\x01" + good[1:])
    with pytest.raises(idx.IDXError, match="magic number"):
        idx.parse_idx(good[:2] + b"\x07" + good[3:])  # no such type code
    with pytest.raises(idx.IDXError, match="too short"):
        idx.parse_idx(b"\x00\x00")
    with pytest.raises(idx.IDXError, match="truncated header"):
        idx.parse_idx(good[:9])
    with pytest.raises(idx.IDXError, match="truncated: 19 bytes"):
        idx.parse_idx(good[:-5])
    with pytest.raises(idx.IDXError, match="trailing bytes"):
        idx.parse_idx(good + b"\x00")
    (tmp_path / "cut.gz").write_bytes(gzip.compress(good)[:-6])
    with pytest.raises(idx.IDXError, match="gzip stream is damaged"):
        idx.read_idx(tmp_path / "cut.gz")


def write_dataset(directory, train: int, test: int, gzipped: bool) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("t10k", test)):
        for kind, array, code in (
            ("images-idx3", rng.integers(0, 256, (n, 5, 4)), 0x08),
            ("labels-idx1", np.arange(n) % 3, 0x08),
        ):
            raw = idx_bytes(array, code)
            name = f"{split}-{kind}-ubyte"
            if gzipped:
                (directory / f"{name}.gz").write_bytes(gzip.compress(raw))
            else:
                (directory / name).write_bytes(raw)


@pytest.mark.parametrize("gzipped", [False, True])
def test_a_dataset_directory_in_the_standard_layout(tmp_path, gzipped):
    write_dataset(tmp_path, 12, 6, gzipped)
    splits = data.load("mnist", data_dir=tmp_path)
    assert len(splits.train) == 12 and len(splits.test) == 6
    assert splits.image_shape == (1, 5, 4) and splits.num_classes == 3
    x, y = splits.train.tensors
    assert x.dtype.is_floating_point and 0 <= float(x.min()) and float(x.max()) <= 1
    assert y.tolist() == [i % 3 for i in range(12)]


def test_a_missing_dataset_names_the_folder_and_how_to_install_it(tmp_path):
    with pytest.raises(FileNotFoundError, match="apt-get install -y dataset-fashion-mnist") as error:
        data.load("fashion-mnist", data_dir=tmp_path)
    assert str(tmp_path) in str(error.value) and "t10k-labels-idx1-ubyte" in str(error.value)
    write_dataset(tmp_path, 4, 2, gzipped=False)
    (tmp_path / "t10k-labels-idx1-ubyte").write_bytes(idx_bytes(np.arange(3, dtype=np.uint8), 0x08))
    with pytest.raises(idx.IDXError, match="test images of shape"):
        data.load("mnist", data_dir=tmp_path)
    with pytest.raises(ValueError, match="data_dir applies to the IDX datasets"):
        data.load("digits", data_dir=tmp_path)


PACKAGE = idx.DEFAULT_DIRS["fashion-mnist"]
HAVE_PACKAGE = all(idx.find_file(PACKAGE, stem) for stem in idx.FILES.values())


@pytest.fixture(scope="module")
def fashion_mnist():
    """The package's files. In CI (``FASTDAL_REQUIRE_DATA`` or ``CI`` set) their absence is a failure: the set-up
    installs the package, so a missing one means it broke and the Fashion-MNIST experiments would go untested."""
    if not HAVE_PACKAGE:
        message = f"Fashion-MNIST is not in {PACKAGE}: apt-get install -y dataset-fashion-mnist"
        if os.environ.get("FASTDAL_REQUIRE_DATA") or os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return idx.load_dataset("fashion-mnist")


def test_the_fashion_mnist_package(fashion_mnist):
    assert fashion_mnist.train_images.shape == (60000, 28, 28) and fashion_mnist.train_images.dtype == np.uint8
    assert fashion_mnist.test_images.shape == (10000, 28, 28)
    assert set(np.unique(fashion_mnist.train_labels)) == set(range(10))
    assert np.bincount(fashion_mnist.train_labels).tolist() == [6000] * 10
    assert np.bincount(fashion_mnist.test_labels).tolist() == [1000] * 10
    assert 200 < fashion_mnist.train_images.max() and fashion_mnist.train_images.min() == 0
