"""SAM-SGT as released (HF ``Two-hot/SAM-SGT``), in its two on-disk forms (the HF dataset `Two-hot/SAM-SGT`; song2yu/SGT `BAGEL/data/dataset_info.py`).

1. Extracted (what the reference loaders read): a list file, one image path per line,
   ``.../sam_selection/<name>.jpg``, absolute or relative to ``root``; the pre-rendered colour mask is
   ``.../sam_mask/<name>.png``: the sibling folder ``sam_mask`` of the image's folder, and the image file's
   STEM + ``.png``. (The reference replaces every "jpg" in the whole path, which breaks on paths that contain
   "jpg" elsewhere; song2yu/SGT `BAGEL/data/sam_190k.py`, `BAGEL/data/dataset_info.py`.) Blank lines and lines starting with '#' are ignored.
2. Tar shards (webdataset style, read directly without extraction): every ``*.tar`` under ``root`` (sorted).
   Members are grouped by their file STEM (basename without its last extension, the same rule as the
   extracted layout); a sample is a ``<name>.jpg`` (or .jpeg) with its ``<name>.png`` mask, wherever they sit
   inside the tar; other members are ignored. A stem seen twice in one shard keeps its last member. The index (member offsets) is built once when
   the source is created by reading only the tar headers; reads then seek straight to the member data.

The masks are used as they are (already rendered). A mask whose size differs from the image (as displayed:
EXIF orientation applied) is skipped as ``size_mismatch``, or resized nearest-neighbour with
``config.data.mask_size_mismatch="resize_nearest"``; never bicubic-resized as in the reference.
"""

from __future__ import annotations

import glob
import os
import tarfile

from sgt_jax.data.sources.base import Source
from sgt_jax.data.sources.common import read_bytes, read_text

IMAGE_EXTS = (".jpg", ".jpeg")
MASK_EXT = ".png"


def mask_path_for(image_path: str) -> str | None:
    """``.../sam_selection/<stem>.jpg`` -> ``.../sam_mask/<stem>.png``; None if the image is not in a
    ``sam_selection`` folder (then no mask can be located)."""
    folder, fname = os.path.split(image_path)
    parent, leaf = os.path.split(folder)
    if leaf != "sam_selection":
        return None
    stem, _ = os.path.splitext(fname)
    return os.path.join(parent, "sam_mask", stem + MASK_EXT)


class SamSgtFolderSource(Source):
    """The extracted layout: a list file of ``sam_selection/<name>.jpg`` paths (see module doc)."""

    name = "sam_sgt"

    def __init__(self, root: str, list_file: str, **kw):
        super().__init__(**kw)
        list_path = list_file if os.path.isabs(list_file) else os.path.join(root, list_file)
        if not os.path.isfile(list_path):
            raise FileNotFoundError(f"sam_sgt: list file {list_path!r} (config.data.sources.seg.list_file) "
                                    "does not exist")
        self.root = root
        lines = [ln.strip() for ln in read_text(list_path, "sam_sgt list file").splitlines()]
        self.paths = [p if os.path.isabs(p) else os.path.join(root, p) for p in lines if p and not p.startswith("#")]
        if not self.paths:
            raise ValueError(f"sam_sgt: list file {list_path!r} names no images")
        self._finish_init()

    def _num_items(self) -> int:
        return len(self.paths)

    def _get(self, j: int) -> dict:
        path = self.paths[j]
        key = os.path.splitext(os.path.basename(path))[0]
        mask = mask_path_for(path)
        return {"task": "seg", "key": key, "source": self.name, "image": read_bytes(path),
                "target": read_bytes(mask) if mask else None}


class SamSgtTarSource(Source):
    """Tar shards read in place (see module doc). ``shards``: explicit list, else every ``*.tar`` under root."""

    name = "sam_sgt"

    def __init__(self, root: str, shards: list[str] | None = None, **kw):
        super().__init__(**kw)
        self.shards = sorted(shards) if shards else sorted(glob.glob(os.path.join(root, "**", "*.tar"),
                                                                     recursive=True))
        if not self.shards:
            raise FileNotFoundError(f"sam_sgt_tar: no *.tar shards under {root!r} (config.data.sources.seg.root)")
        # index entries: (key, shard_id, image (offset, size) | None, mask (offset, size) | None)
        self.index: list[tuple[str, int, tuple[int, int] | None, tuple[int, int] | None]] = []
        for sid, shard in enumerate(self.shards):
            groups: dict[str, dict[str, tuple[int, int]]] = {}
            try:
                with tarfile.open(shard, mode="r:") as tf:  # uncompressed tar: members are seekable in place
                    for m in tf:
                        if not m.isfile():
                            continue
                        stem, ext = os.path.splitext(os.path.basename(m.name))
                        kind = "image" if ext.lower() in IMAGE_EXTS else "mask" if ext.lower() == MASK_EXT else None
                        if kind and stem:
                            groups.setdefault(stem, {})[kind] = (m.offset_data, m.size)
            except tarfile.TarError as err:  # also a compressed tar: shards are read in place, uncompressed
                raise ValueError(f"sam_sgt_tar: {shard}: not a readable uncompressed tar file ({err})") from None
            for stem in sorted(groups):
                g = groups[stem]
                if "image" not in g:  # a mask without an image is not a sample
                    continue
                self.index.append((stem, sid, g.get("image"), g.get("mask")))
        if not self.index:
            raise ValueError(f"sam_sgt_tar: no <name>.jpg members in {len(self.shards)} shard(s) under {root!r}")
        self._finish_init()

    def _num_items(self) -> int:
        return len(self.index)

    def _read(self, sid: int, loc: tuple[int, int] | None) -> bytes | None:
        if loc is None:
            return None
        offset, size = loc
        # A fresh handle per read: safe across forked/spawned Grain workers, and cheap next to JPEG decode.
        with open(self.shards[sid], "rb") as f:
            f.seek(offset)
            return f.read(size)

    def _get(self, j: int) -> dict:
        key, sid, img, mask = self.index[j]
        return {"task": "seg", "key": key, "source": self.name, "image": self._read(sid, img),
                "target": self._read(sid, mask)}
