"""Reading and writing safetensors files one tensor (or one slice) at a time.

Why not just ``safetensors.numpy.load_file`` / ``save_file``: both hold the whole file in host memory,
and BAGEL's ``ema.safetensors`` is 29 GB. Here

* reading goes through ``safe_open(...).get_slice(...)`` (memory-mapped): a caller asks for a slice and
  only those bytes are touched. bf16 tensors come back as ``ml_dtypes.bfloat16`` numpy arrays.
* writing is streamed: the header (names, dtypes, shapes, offsets) is computed up front from a list of
  tensor specs, then every tensor is written at its offset as soon as it is produced, so at most one
  tensor is on the host. The safetensors library has no incremental writer, so the (simple, documented)
  file layout is written here: 8-byte little-endian header length, JSON header padded with spaces to a
  multiple of 8, then the raw little-endian tensor bytes, contiguous, in header order. Files written here
  are read back by ``safe_open`` in the tests (and by the official PyTorch loader).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import ml_dtypes
import numpy as np
from safetensors import safe_open

# safetensors dtype code <-> numpy dtype (the ones a BAGEL folder can hold).
_DTYPES = {
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16),
    "F32": np.dtype(np.float32),
    "F64": np.dtype(np.float64),
    "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16),
    "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8),
    "BOOL": np.dtype(np.bool_),
}
_CODES = {v: k for k, v in _DTYPES.items()}


def numpy_dtype(code: str) -> np.dtype:
    """The numpy dtype of a safetensors dtype code such as ``"BF16"``."""
    if code not in _DTYPES:
        raise ValueError(f"unsupported safetensors dtype {code!r}; supported: {sorted(_DTYPES)}")
    return _DTYPES[code]


def dtype_code(dtype) -> str:
    """The safetensors dtype code of a numpy dtype (``ml_dtypes.bfloat16`` -> ``"BF16"``)."""
    dt = np.dtype(dtype)
    if dt not in _CODES:
        raise ValueError(f"dtype {dt} cannot be written to safetensors here; supported: {sorted(_CODES)}")
    return _CODES[dt]


@dataclass(frozen=True)
class TensorInfo:
    """One header entry: dtype code (``"BF16"``...) and shape."""

    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * numpy_dtype(self.dtype).itemsize


def read_header(path: str) -> dict[str, TensorInfo]:
    """Names, dtypes and shapes of every tensor in ``path``; reads the JSON header only, no tensor bytes."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"safetensors file not found: {path}")
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{path}: not a safetensors file (shorter than 8 bytes)")
        (n,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if n > size - 8 or n > 100_000_000:
            raise ValueError(f"{path}: corrupt safetensors header length {n} (file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise ValueError(f"{path}: not a safetensors file (its header is not JSON)") from None
    ends = [int(e["data_offsets"][1]) for k, e in header.items() if k != "__metadata__" and "data_offsets" in e]
    if ends and 8 + n + max(ends) > size:
        raise ValueError(f"{path}: truncated: the header places tensor data up to byte {8 + n + max(ends)}, the "
                         f"file has {size} bytes")
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        out[name] = TensorInfo(dtype=entry["dtype"], shape=tuple(int(d) for d in entry["shape"]))
    return out


def read_metadata(path: str) -> dict[str, str]:
    """The free-form ``__metadata__`` string map of a safetensors file (empty if none)."""
    with safe_open(path, framework="numpy") as f:
        return dict(f.metadata() or {})


class SliceReader:
    """Reads tensors or slices of tensors from one safetensors file (memory-mapped).

    ``bytes_read`` counts the bytes of every slice returned, so tests and benchmarks can check that a
    process reads only what it owns. Use as a context manager or call ``close()``.
    """

    def __init__(self, path: str):
        if not os.path.isfile(path):
            raise FileNotFoundError(f"safetensors file not found: {path}")
        self.path = path
        self._cm = safe_open(path, framework="numpy")
        self._f = self._cm.__enter__()
        self._keys = set(self._f.keys())
        self.bytes_read = 0

    def keys(self) -> set[str]:
        return set(self._keys)

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        """Tensor ``name`` (or ``name[index]`` with one basic slice per dim) in its stored dtype."""
        if name not in self._keys:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        sl = self._f.get_slice(name)
        shape = tuple(sl.get_shape())
        if index is None:
            index = tuple(slice(None) for _ in shape)
        if len(index) != len(shape):
            raise ValueError(f"{name}: index has {len(index)} dims, tensor has {len(shape)} ({shape})")
        arr = np.asarray(sl[tuple(index)]) if shape else np.asarray(self._f.get_tensor(name))
        self.bytes_read += arr.nbytes
        return arr

    def release(self):
        """Unmap and reopen the file: pages read so far stop counting in this process's RSS (they were
        clean page cache, but a long import would otherwise map the whole file)."""
        self.close()
        self._cm = safe_open(self.path, framework="numpy")
        self._f = self._cm.__enter__()

    def close(self):
        if self._cm is not None:
            self._cm.__exit__(None, None, None)
            self._cm = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class MultiFileReader:
    """``SliceReader``'s interface over a tensor set sharded into several safetensors files (diffusers'
    ``diffusion_pytorch_model-0000i-of-0000n.safetensors``, transformers' ``model-*.safetensors``):
    every key is read from the file that holds it. A key present in two files is an error."""

    def __init__(self, paths: Iterable[str]):
        self.paths = list(paths)
        self._readers = [SliceReader(p) for p in self.paths]
        self._owner: dict[str, SliceReader] = {}
        for r in self._readers:
            for k in r.keys():
                if k in self._owner:
                    self.close()
                    raise ValueError(f"tensor {k!r} is in both {self._owner[k].path} and {r.path}")
                self._owner[k] = r

    @property
    def bytes_read(self) -> int:
        return sum(r.bytes_read for r in self._readers)

    def keys(self) -> set[str]:
        return set(self._owner)

    def file_of(self, name: str) -> str:
        return self._owner[name].path

    def read(self, name: str, index: tuple[slice, ...] | None = None) -> np.ndarray:
        if name not in self._owner:
            raise KeyError(f"no tensor named {name!r} in {self.paths}")
        return self._owner[name].read(name, index)

    def release(self):
        for r in self._readers:
            r.release()

    def close(self):
        for r in self._readers:
            r.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class StreamingWriter:
    """Writes a safetensors file tensor by tensor, in any order, holding one tensor at a time.

    ``specs`` fixes every name, dtype and shape before the first byte is written (the header comes first
    in the file). ``write(name, array)`` checks the array against its spec; ``close()`` fails if any
    declared tensor was never written, and removes the partial file in that case.
    """

    def __init__(self, path: str, specs: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None):
        self.path = path
        self.specs = dict(specs)
        header: dict = {}
        if metadata:
            header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
        offset = 0
        self._offsets = {}
        for name in sorted(self.specs):  # sorted, like safetensors' own writer
            info = self.specs[name]
            numpy_dtype(info.dtype)  # validates the code
            header[name] = {"dtype": info.dtype, "shape": list(info.shape),
                            "data_offsets": [offset, offset + info.nbytes]}
            self._offsets[name] = offset
            offset += info.nbytes
        blob = json.dumps(header, separators=(",", ":")).encode()
        blob += b" " * (-len(blob) % 8)
        self._data_start = 8 + len(blob)
        self._total = offset
        self._written: set[str] = set()
        self._rows: dict[str, np.ndarray] = {}  # partially written tensors: which rows are done
        self._f = open(path, "wb")
        self._f.write(struct.pack("<Q", len(blob)))
        self._f.write(blob)
        self._f.truncate(self._data_start + self._total)

    def write(self, name: str, array: np.ndarray):
        if name not in self.specs:
            raise KeyError(f"{self.path}: tensor {name!r} was not declared in the header")
        if name in self._written or name in self._rows:
            raise ValueError(f"{self.path}: tensor {name!r} written twice")
        info = self.specs[name]
        arr = np.asarray(array)
        if arr.dtype != numpy_dtype(info.dtype) or tuple(arr.shape) != info.shape:
            raise ValueError(f"{self.path}: tensor {name!r} is {arr.dtype}{list(arr.shape)}, "
                             f"declared {info.dtype}{list(info.shape)}")
        self._f.seek(self._data_start + self._offsets[name])
        self._f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        self._written.add(name)

    def write_rows(self, name: str, start: int, block: np.ndarray):
        """Write rows ``[start, start + len(block))`` of tensor ``name`` (big tensors in pieces).

        The tensor counts as written once all its rows were written exactly once."""
        if name not in self.specs:
            raise KeyError(f"{self.path}: tensor {name!r} was not declared in the header")
        info = self.specs[name]
        arr = np.asarray(block)
        if not info.shape or arr.dtype != numpy_dtype(info.dtype) or tuple(arr.shape[1:]) != info.shape[1:] \
                or start < 0 or start + arr.shape[0] > info.shape[0]:
            raise ValueError(f"{self.path}: rows [{start}, {start + (arr.shape[0] if arr.ndim else 0)}) of "
                             f"{arr.dtype}{list(arr.shape)} do not fit tensor {name!r} "
                             f"{info.dtype}{list(info.shape)}")
        done = self._rows.setdefault(name, np.zeros(info.shape[0], bool))
        if done[start:start + arr.shape[0]].any():
            raise ValueError(f"{self.path}: rows of tensor {name!r} written twice")
        row_bytes = info.nbytes // info.shape[0]
        self._f.seek(self._data_start + self._offsets[name] + start * row_bytes)
        self._f.write(np.ascontiguousarray(arr).astype(arr.dtype.newbyteorder("<"), copy=False).tobytes())
        done[start:start + arr.shape[0]] = True
        if done.all():
            self._written.add(name)
            del self._rows[name]

    def close(self, allow_missing: bool = False):
        """Finish the file. Unwritten tensors are an error (the partial file is removed) unless
        ``allow_missing``: then they stay zero-filled holes (header-only test folders: sparse files)."""
        if self._f is None:
            return
        self._f.close()
        self._f = None
        missing = sorted(set(self.specs) - self._written)
        if missing and not allow_missing:
            os.remove(self.path)
            raise ValueError(f"{self.path}: {len(missing)} declared tensors were never written: {missing[:20]}")

    def abort(self):
        """Close and delete the partial file (used when an exception interrupts the export)."""
        if self._f is not None:
            self._f.close()
            self._f = None
        if os.path.exists(self.path):
            os.remove(self.path)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        if exc_type is not None:
            self.abort()
        else:
            self.close()


def write_all(path: str, tensors: Iterable[tuple[str, np.ndarray]], metadata=None):
    """Write an in-memory {name: array} set (small files: tests, the VAE) through ``StreamingWriter``."""
    tensors = list(tensors)
    specs = {n: TensorInfo(dtype_code(a.dtype), tuple(a.shape)) for n, a in tensors}
    with StreamingWriter(path, specs, metadata) as w:
        for n, a in tensors:
            w.write(n, a)
