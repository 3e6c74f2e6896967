"""Streaming weight movement: safetensors slices -> sharded jax.Arrays, and sharded arrays -> safetensors.

Import (``fill_from_table``): every parameter is created with ``jax.make_array_from_callback`` on its
target sharding; the callback receives the index of one device's shard and reads exactly that slice
of the PyTorch tensor(s) through the table's slice mapping (``Entry.read_slice``). Stacked (scanned)
parameters are filled one layer at a time, and other big parameters in row blocks of ~256 MB: a block
array is made from slices, then written into a donated device buffer (``dynamic_update_slice``), so
the host never holds more than one block and the peak host memory does not grow with model size.

Export (``write_table``): one PyTorch tensor at a time (one layer of a stacked parameter) is brought to
the host, transformed back to the PyTorch layout, cast to the file dtype and written at its offset in
the output file (``StreamingWriter``). In a multi-process run every process takes part in the gathers
and process 0 writes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from sgt_jax.checkpoint.safetensors_io import SliceReader, StreamingWriter, TensorInfo, numpy_dtype
from sgt_jax.checkpoint.table import Entry, get_path
from sgt_jax.checkpoint.table import set_path


def _cached_reader(read: Callable[[str, tuple[slice, ...]], np.ndarray]):
    """Replicated shards ask for the same slice once per device: read it once per call."""
    cache: dict = {}

    def cached(key, index):
        k = (key, tuple((s.start, s.stop) for s in index))
        if k not in cache:
            cache.clear()  # keep at most one slice alive
            cache[k] = read(key, index)
        return cache[k]

    return cached


def _index_tuple(index, shape) -> tuple[slice, ...]:
    """make_array_from_callback's index (slices or Ellipsis-free) -> concrete slices."""
    out = []
    for s, d in zip(tuple(index) + (slice(None),) * (len(shape) - len(tuple(index))), shape):
        start, stop, _ = s.indices(d)
        out.append(slice(start, stop))
    return tuple(out)


BLOCK_BYTES = 256 << 20  # a parameter bigger than this is filled in blocks of about this size


@functools.partial(jax.jit, donate_argnums=0, static_argnums=3)
def _put_block(full, block, start, axis):
    """Write ``block`` at offset ``start`` (traced: one compile per shape) along ``axis`` of donated ``full``."""
    return jax.lax.dynamic_update_slice_in_dim(full, block.astype(full.dtype), start, axis=axis)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def _block_axis(entry: Entry, sharding) -> int | None:
    """The axis to fill block by block: the layers axis of a stacked parameter, else the first axis
    that is not split over devices (blocks along it keep the parameter's sharding valid)."""
    spec = tuple(sharding.spec) + (None,) * (len(entry.param_shape) - len(tuple(sharding.spec)))
    mesh_shape = dict(sharding.mesh.shape)

    def unsplit(a):
        names = spec[a]
        names = () if names is None else ((names,) if isinstance(names, str) else tuple(names))
        return int(np.prod([mesh_shape[n] for n in names])) == 1

    if entry.layers is not None and unsplit(0):
        return 0
    for a, d in enumerate(entry.param_shape):
        if d > 1 and unsplit(a):
            return a
    return None


def fill_entry(entry: Entry, reader: SliceReader, target: jax.ShapeDtypeStruct,
               block_bytes: int = BLOCK_BYTES) -> jax.Array:
    """One parameter as a sharded ``jax.Array`` (shape/dtype/sharding of ``target``) read slice by slice.

    Small parameters are made in one ``make_array_from_callback``. Big ones (and every stacked one,
    one layer per block at least) are made block by block along an axis that is not split over devices,
    each block written into a donated device buffer: the host holds one block's slices at a time."""
    if tuple(target.shape) != entry.param_shape:
        raise ValueError(f"{'/'.join(entry.path)}: model shape {tuple(target.shape)} != table shape "
                         f"{entry.param_shape} (the table and the model disagree)")
    dtype = np.dtype(target.dtype)
    read = _cached_reader(reader.read)
    sharding = target.sharding
    shape = entry.param_shape
    nbytes = int(np.prod(shape)) * dtype.itemsize
    axis = _block_axis(entry, sharding) if (entry.layers is not None or nbytes > block_bytes) else None
    if axis is None:
        def cb(index):
            return np.ascontiguousarray(entry.read_slice(read, _index_tuple(index, shape)), dtype=dtype)

        out = jax.make_array_from_callback(shape, sharding, cb)
        reader.release()
        return out

    per_unit = max(1, nbytes // shape[axis])
    step = 1 if entry.layers is not None and axis == 0 else max(1, block_bytes // per_unit)
    full = _zeros_fn(shape, dtype, sharding)()
    for start in range(0, shape[axis], step):
        stop = min(shape[axis], start + step)
        block_shape = shape[:axis] + (stop - start,) + shape[axis + 1:]

        def cb(index, start=start, block_shape=block_shape):
            idx = list(_index_tuple(index, block_shape))
            idx[axis] = slice(start + idx[axis].start, start + idx[axis].stop)
            return np.ascontiguousarray(entry.read_slice(read, tuple(idx)), dtype=dtype)

        block = jax.make_array_from_callback(block_shape, sharding, cb)
        full = _put_block(full, block, np.int32(start), axis)
        reader.release()
    return full


def fill_from_table(table: list[Entry], reader: SliceReader, abstract: Mapping, out: dict,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Fill every table row into ``out`` (nested dict) from the shardings in ``abstract`` (nested dict of
    ShapeDtypeStructs). ``progress(nbytes)`` is called after each parameter."""
    for e in table:
        arr = fill_entry(e, reader, get_path(abstract, e.path))
        set_path(out, e.path, arr)
        if progress is not None:
            progress(int(np.prod(e.param_shape)) * np.dtype(arr.dtype).itemsize)
    return out


def place_numpy(tree: Mapping, abstract: Mapping) -> dict:
    """Host numpy tree -> sharded jax arrays with ``abstract``'s shardings (small trees: the VAE)."""
    def one(arr, sds):
        arr = np.asarray(arr, dtype=sds.dtype)
        if arr.shape != tuple(sds.shape):
            raise ValueError(f"shape {arr.shape} != model shape {tuple(sds.shape)}")
        return jax.make_array_from_callback(arr.shape, sds.sharding, lambda idx: arr[idx])

    return jax.tree.map(one, dict(tree), dict(abstract))


def to_host(x, i: int | None = None) -> np.ndarray:
    """``x`` (or its layer ``i``) on the host as numpy; gathers across processes when needed."""
    if isinstance(x, jax.Array):
        part = x[i] if i is not None else x
        if not part.is_fully_addressable:
            part = multihost_utils.process_allgather(part, tiled=True)
        return np.asarray(part)
    arr = np.asarray(x)
    return arr[i] if i is not None else arr


def table_specs(table: list[Entry], dtype_code: str) -> dict[str, TensorInfo]:
    """The safetensors header entries of every PyTorch tensor of ``table``, in dtype ``dtype_code``."""
    return {k: TensorInfo(dtype_code, e.torch_shape) for e in table for k in e.torch_keys()}


def write_table(table: list[Entry], tree: Mapping, writer: StreamingWriter | None,
                dtype_code: str | Callable[[str], str], progress: Callable[[int], None] | None = None,
                only: set[str] | None = None) -> None:
    """Write every row of ``table`` from ``tree`` (jax or numpy leaves) through ``writer``.

    ``writer`` is None on processes other than 0 (they only take part in the gathers). ``dtype_code`` is
    one safetensors code or a function of the key; ``only`` restricts the keys written (one shard file
    of a sharded set: a stacked parameter's layers may lie in different files)."""
    code_of = dtype_code if callable(dtype_code) else (lambda key: dtype_code)
    for e in table:
        leaf = get_path(tree, e.path)
        if tuple(np.shape(leaf)) != e.param_shape:
            raise ValueError(f"{'/'.join(e.path)}: shape {tuple(np.shape(leaf))} != table shape {e.param_shape}")
        layers = [None] if e.layers is None else list(range(e.layers))
        for i, key in zip(layers, e.torch_keys()):
            if only is not None and key not in only:
                continue
            t = e.to_torch(to_host(leaf, i)).astype(numpy_dtype(code_of(key)))
            if writer is not None:
                writer.write(key, t)
            if progress is not None:
                progress(t.nbytes)
            del t
