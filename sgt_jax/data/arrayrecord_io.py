"""ArrayRecord shards of canonical raw records (sources/common.py): the output of ``--mode prepare`` and the
input of ``PreparedSource``.

Record encoding: msgpack (binary-safe, no pickle, so reading a shard never executes code) of the canonical
dict plus a format tag ``"_v": 1``; image fields stay as their original encoded bytes (JPEG/PNG), so a prepared
shard is about the size of the raw data. Shards are named ``<family>-<i:05d>-of-<n:05d>.array_record``
(family ``seg`` or ``vqa``) and written with ``group_size:1`` for fast random access.
"""

from __future__ import annotations

import glob
import os
import re

import msgpack

from sgt_jax.data.records import BadSample

FORMAT_VERSION = 1
WRITER_OPTIONS = "group_size:1"
_SHARD_RE = re.compile(r"^(seg|vqa)-(\d{5})-of-(\d{5})\.array_record$")


def pack_record(canonical: dict) -> bytes:
    return msgpack.packb(dict(canonical, _v=FORMAT_VERSION), use_bin_type=True)


def unpack_record(data: bytes) -> dict:
    """Inverse of ``pack_record``; undecodable bytes or another format version -> BadSample bad_record."""
    try:
        rec = msgpack.unpackb(data, raw=False)
    except (msgpack.exceptions.ExtraData, msgpack.exceptions.UnpackException, ValueError) as err:
        raise BadSample("bad_record", f"undecodable prepared record: {err}") from None
    if not isinstance(rec, dict) or rec.get("_v") != FORMAT_VERSION:
        raise BadSample("bad_record", f"prepared record has format {rec.get('_v') if isinstance(rec, dict) else '?'}, "
                                      f"this code reads {FORMAT_VERSION}")
    rec.pop("_v")
    return rec


def shard_name(family: str, i: int, n: int) -> str:
    return f"{family}-{i:05d}-of-{n:05d}.array_record"


def find_shards(root: str, family: str) -> list[str]:
    """The complete, consistent shard set of ``family`` under ``root`` (error if one is missing)."""
    paths = sorted(p for p in glob.glob(os.path.join(root, f"{family}-*-of-*.array_record"))
                   if _SHARD_RE.match(os.path.basename(p)))
    if not paths:
        raise FileNotFoundError(f"no prepared {family!r} shards ({family}-NNNNN-of-NNNNN.array_record) in {root!r}; "
                                "run --mode prepare first")
    totals = {int(_SHARD_RE.match(os.path.basename(p)).group(3)) for p in paths}
    if len(totals) != 1 or len(paths) != totals.pop():
        raise ValueError(f"incomplete or mixed prepared shard set for {family!r} in {root!r}: {paths}")
    return paths
