"""The conversion engine: name tables between PyTorch keys and our parameter paths, as DATA.

A table is a list of ``Entry`` rows. Each row says which parameter (a path in the nested param dict)
comes from which PyTorch tensor(s), and how the PyTorch array is laid out relative to ours:

* ``torch_shape``: the PyTorch tensor's shape (e.g. a Linear weight ``(out, in)``).
* ``factors``: how each PyTorch dim splits into finer dims (``(out, in)`` with out = heads·head_dim
  becomes ``((heads, head_dim), (in,))``); a dim that does not split is ``(d,)``.
* ``perm``: which of those finer dims becomes each of our dims (Linear -> kernel is a transpose:
  ``((out,), (in,))`` with ``perm=(1, 0)``).
* ``layers``: for a stacked (scanned) parameter, the number of layers L; the key then holds ``{i}`` and
  our array gets a leading axis of size L (scan axis 0) made of the per-layer tensors.

Every transformation is therefore a (reshape, transpose, stack), which lets the streaming importer
map a request for *a slice of our array* back to *a slice of the PyTorch tensor*: the layer range selects
which per-layer tensors to read; a slice of a finer dim selects a contiguous range of its PyTorch dim
(reading the bounding range of the leading factor and sub-selecting the rest in numpy). Nothing beyond
reshape/transpose/stack is needed for BAGEL's LLM, heads and ViT; the VAE's convs are converted in
memory by the vision tables (the VAE is small and of fixed size).

The same rows drive the in-memory converters (``state_dict_to_tree`` / ``tree_to_state_dict``), the
streaming import (``read_slice``) and the streaming export (``to_torch``), so there is one source of truth.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import numpy as np


class ConversionError(ValueError):
    """A state dict / folder does not match the table. The message lists every problem."""

    def __init__(self, problems: Iterable[str], what: str = "state dict"):
        self.problems = list(problems)
        head = f"{what} does not match the model ({len(self.problems)} problem(s)):"
        super().__init__("\n  ".join([head] + self.problems))


@dataclass(frozen=True)
class Entry:
    """One parameter <-> one PyTorch tensor (or one per layer when ``layers`` is set)."""

    path: tuple[str, ...]
    key: str  # PyTorch key; contains "{i}" iff layers is set
    torch_shape: tuple[int, ...]
    factors: tuple[tuple[int, ...], ...] | None = None  # default: no split
    perm: tuple[int, ...] | None = None  # default: identity
    layers: int | None = None

    def __post_init__(self):
        if (self.layers is None) == ("{i}" in self.key):
            raise ValueError(f"{self.key}: '{{i}}' in the key iff layers is set")
        factors = self.factors or tuple((d,) for d in self.torch_shape)
        if len(factors) != len(self.torch_shape) or any(
                math.prod(f) != d for f, d in zip(factors, self.torch_shape)):
            raise ValueError(f"{self.key}: factors {factors} do not multiply to {self.torch_shape}")
        object.__setattr__(self, "factors", tuple(tuple(f) for f in factors))
        n = sum(len(f) for f in factors)
        perm = tuple(range(n)) if self.perm is None else tuple(self.perm)
        if sorted(perm) != list(range(n)):
            raise ValueError(f"{self.key}: perm {perm} is not a permutation of {n} dims")
        object.__setattr__(self, "perm", perm)

    # ---- shapes ----
    @property
    def view_shape(self) -> tuple[int, ...]:
        """The PyTorch tensor reshaped to its finer dims."""
        return tuple(d for f in self.factors for d in f)

    @property
    def param_shape(self) -> tuple[int, ...]:
        view = self.view_shape
        body = tuple(view[p] for p in self.perm)
        return ((self.layers,) if self.layers is not None else ()) + body

    def torch_keys(self) -> list[str]:
        if self.layers is None:
            return [self.key]
        return [self.key.format(i=i) for i in range(self.layers)]

    # ---- whole-tensor transforms ----
    def to_param(self, t: np.ndarray) -> np.ndarray:
        """One PyTorch tensor -> our layout (one layer's worth for stacked entries)."""
        return np.transpose(np.reshape(t, self.view_shape), self.perm)

    def to_torch(self, p: np.ndarray) -> np.ndarray:
        """Our array (one layer of it for stacked entries) -> the PyTorch tensor."""
        return np.reshape(np.transpose(p, np.argsort(self.perm)), self.torch_shape)

    # ---- slices ----
    def read_slice(self, read: Callable[[str, tuple[slice, ...]], np.ndarray],
                   index: tuple[slice, ...]) -> np.ndarray:
        """``param[index]`` built by reading only the needed PyTorch slices through ``read(key, slices)``.

        ``index`` has one slice (step 1, concrete start/stop or None) per param dim.
        """
        shape = self.param_shape
        index = _normalise(index, shape)
        if self.layers is not None:
            layer_sl, body_idx = index[0], index[1:]
            parts = [self._read_body(read, self.key.format(i=i), body_idx)
                     for i in range(layer_sl.start, layer_sl.stop)]
            return np.stack(parts, axis=0)
        return self._read_body(read, self.key, index)

    def _read_body(self, read, key: str, index: tuple[slice, ...]) -> np.ndarray:
        view_idx = [None] * len(self.perm)
        for k, p in enumerate(self.perm):
            view_idx[p] = index[k]
        torch_idx, post_idx, pos = [], [], 0
        for f in self.factors:
            sls = view_idx[pos:pos + len(f)]
            pos += len(f)
            inner = math.prod(f[1:])
            torch_idx.append(slice(sls[0].start * inner, sls[0].stop * inner))
            post_idx.extend([slice(None)] + list(sls[1:]))
        t = read(key, tuple(torch_idx))
        # The read block, split into finer dims: the leading factor of each PyTorch dim is already cut
        # to its range; the other factors are whole and are cut now.
        shape, pos = [], 0
        for f in self.factors:
            shape.extend([view_idx[pos].stop - view_idx[pos].start] + list(f[1:]))
            pos += len(f)
        t = np.reshape(t, shape)[tuple(post_idx)]
        return np.transpose(t, self.perm)


def _normalise(index, shape) -> tuple[slice, ...]:
    if len(index) != len(shape):
        raise ValueError(f"index {index} has {len(index)} dims, the param has {len(shape)} ({shape})")
    out = []
    for s, d in zip(index, shape):
        start, stop, step = s.indices(d)
        if step != 1:
            raise ValueError(f"only step-1 slices are supported, got {s}")
        out.append(slice(start, max(start, stop)))
    return tuple(out)


# ---- tables as a whole ----------------------------------------------------------------------------


def expected_shapes(table: Iterable[Entry]) -> dict[str, tuple[int, ...]]:
    """Every PyTorch key the table reads, with its shape."""
    out = {}
    for e in table:
        for k in e.torch_keys():
            if k in out:
                raise ValueError(f"table lists {k!r} twice")
            out[k] = e.torch_shape
    return out


def check_keys(expected: Mapping[str, tuple[int, ...]], actual: Mapping[str, tuple[int, ...]],
               what: str, ignore: Iterable[str] = ()) -> list[str]:
    """Every missing, unexpected and mis-shaped key, as readable lines (empty list: all good)."""
    ignore = set(ignore)
    problems = []
    for k in sorted(set(expected) - set(actual)):
        problems.append(f"missing in {what}: {k} (expected shape {list(expected[k])})")
    for k in sorted(set(actual) - set(expected) - ignore):
        problems.append(f"unexpected in {what}: {k} (shape {list(actual[k])})")
    for k in sorted(set(expected) & set(actual)):
        if tuple(actual[k]) != tuple(expected[k]):
            problems.append(f"wrong shape in {what}: {k} is {list(actual[k])}, expected {list(expected[k])}")
    return problems


def set_path(tree: dict, path: tuple[str, ...], value) -> None:
    node = tree
    for p in path[:-1]:
        node = node.setdefault(p, {})
    if path[-1] in node:
        raise ValueError(f"parameter {'/'.join(path)} is set twice")
    node[path[-1]] = value


def get_path(tree: Mapping, path: tuple[str, ...]):
    node = tree
    for p in path:
        if not isinstance(node, Mapping) or p not in node:
            raise KeyError(f"parameter {'/'.join(map(str, path))} is not in the tree")
        node = node[p]
    return node


def flatten_paths(tree: Mapping, prefix: tuple = ()) -> dict[tuple, object]:
    """Nested dict -> {path tuple: leaf}. Keys are turned into str (nnx lists use int keys)."""
    out = {}
    for k, v in tree.items():
        path = prefix + (str(k),)
        if isinstance(v, Mapping):
            out.update(flatten_paths(v, path))
        else:
            out[path] = v
    return out


def state_dict_to_tree(table: list[Entry], state_dict: Mapping[str, np.ndarray], *, dtype=np.float32,
                       ignore: Iterable[str] = (), what: str = "state dict") -> dict:
    """In-memory conversion: a full PyTorch state dict -> nested dict of numpy arrays in ``dtype``.

    Raises ``ConversionError`` naming every missing / unexpected / mis-shaped key (keys in ``ignore``
    may be present or absent)."""
    actual = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    problems = check_keys(expected_shapes(table), actual, what, ignore=ignore)
    if problems:
        raise ConversionError(problems, what)
    tree: dict = {}
    for e in table:
        if e.layers is None:
            arr = e.to_param(np.asarray(state_dict[e.key]))
        else:
            arr = np.stack([e.to_param(np.asarray(state_dict[k])) for k in e.torch_keys()], axis=0)
        set_path(tree, e.path, np.asarray(arr, dtype=dtype))
    return tree


def tree_to_state_dict(table: list[Entry], tree: Mapping, *, dtype=None) -> dict[str, np.ndarray]:
    """In-memory inverse of ``state_dict_to_tree`` (``dtype`` None keeps the tree's dtype)."""
    check_tree(table, tree)
    out = {}
    for e in table:
        arr = np.asarray(get_path(tree, e.path))
        if e.layers is None:
            out[e.key] = e.to_torch(arr)
        else:
            for i, k in enumerate(e.torch_keys()):
                out[k] = e.to_torch(arr[i])
    if dtype is not None:
        out = {k: np.asarray(v).astype(dtype) for k, v in out.items()}
    return out


def check_tree(table: list[Entry], tree: Mapping, what: str = "parameter tree", ignore_prefixes=()) -> None:
    """The tree holds exactly the table's paths with the table's shapes (else ``ConversionError``)."""
    expected = {"/".join(e.path): e.param_shape for e in table}
    actual = {"/".join(p): tuple(np.shape(v)) for p, v in flatten_paths(tree).items()
              if not any("/".join(p).startswith(pre) for pre in ignore_prefixes)}
    problems = check_keys(expected, actual, what)
    if problems:
        raise ConversionError(problems, what)
