"""Streaming weight movement: safetensors slices -> sharded jax.Arrays, and sharded arrays -> safetensors.

Import (``fill_from_table``): every parameter is created with ``jax.make_array_from_callback`` on its
target sharding; the callback receives the index of one device's shard and reads exactly that slice
of the PyTorch tensor(s) through the table's slice mapping (``Entry.read_slice``). Stacked (scanned)
parameters are filled one layer at a time: a per-layer array is made from slices, then written into a
donated device buffer (``dynamic_update_slice``), so the host never holds more than one layer's shard
and the peak host memory does not grow with the number of layers.

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
from jax.sharding import NamedSharding, PartitionSpec

from sgt_jax.checkpoint.safetensors_io import SliceReader, StreamingWriter, TensorInfo, numpy_dtype
from sgt_jax.checkpoint.table import Entry, get_path


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


def _drop_first(sharding: NamedSharding) -> NamedSharding:
    spec = tuple(sharding.spec)
    return NamedSharding(sharding.mesh, PartitionSpec(*spec[1:]))


@functools.partial(jax.jit, donate_argnums=0)
def _put_layer(stacked, layer, i):
    """Write ``layer`` at index ``i`` (traced: one compile per shape) of the donated ``stacked``."""
    return jax.lax.dynamic_update_index_in_dim(stacked, layer.astype(stacked.dtype), i, axis=0)


@functools.lru_cache(maxsize=None)
def _zeros_fn(shape, dtype, sharding):
    return jax.jit(lambda: jnp.zeros(shape, dtype), out_shardings=sharding)


def fill_entry(entry: Entry, reader: SliceReader, target: jax.ShapeDtypeStruct) -> jax.Array:
    """One parameter as a sharded ``jax.Array`` (shape/dtype/sharding of ``target``) read slice by slice."""
    if tuple(target.shape) != entry.param_shape:
        raise ValueError(f"{'/'.join(entry.path)}: model shape {tuple(target.shape)} != table shape "
                         f"{entry.param_shape} (the table and the model disagree)")
    dtype = np.dtype(target.dtype)
    read = _cached_reader(reader.read)
    sharding = target.sharding
    if entry.layers is None:
        def cb(index):
            idx = _index_tuple(index, entry.param_shape)
            return entry.read_slice(read, idx).astype(dtype)

        return jax.make_array_from_callback(entry.param_shape, sharding, cb)

    body_shape = entry.param_shape[1:]
    layer_sharding = _drop_first(sharding)
    stacked = _zeros_fn(entry.param_shape, dtype, sharding)()
    for i in range(entry.layers):
        def cb(index, i=i):
            idx = (slice(i, i + 1),) + _index_tuple(index, body_shape)
            return entry.read_slice(read, idx)[0].astype(dtype)

        layer = jax.make_array_from_callback(body_shape, layer_sharding, cb)
        stacked = _put_layer(stacked, layer, np.int32(i))
    return stacked


def fill_from_table(table: list[Entry], reader: SliceReader, abstract: Mapping, out: dict,
                    progress: Callable[[int], None] | None = None) -> dict:
    """Fill every table row into ``out`` (nested dict) from the shardings in ``abstract`` (nested dict of
    ShapeDtypeStructs). ``progress(nbytes)`` is called after each parameter."""
    from sgt_jax.checkpoint.table import set_path

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


def write_table(table: list[Entry], tree: Mapping, writer: StreamingWriter | None, dtype_code: str,
                progress: Callable[[int], None] | None = None) -> None:
    """Write every row of ``table`` from ``tree`` (jax or numpy leaves) through ``writer``.

    ``writer`` is None on processes other than 0 (they only take part in the gathers)."""
    out_dtype = numpy_dtype(dtype_code)
    for e in table:
        leaf = get_path(tree, e.path)
        if tuple(np.shape(leaf)) != e.param_shape:
            raise ValueError(f"{'/'.join(e.path)}: shape {tuple(np.shape(leaf))} != table shape {e.param_shape}")
        layers = [None] if e.layers is None else list(range(e.layers))
        for i, key in zip(layers, e.torch_keys()):
            t = e.to_torch(to_host(leaf, i)).astype(out_dtype)
            if writer is not None:
                writer.write(key, t)
            if progress is not None:
                progress(t.nbytes)
            del t
