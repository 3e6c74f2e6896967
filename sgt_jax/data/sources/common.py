"""Shared pieces of every source: image decoding with bad-data classification, the canonical raw record,
and the decode of canonical records into the ``records.py`` sample dicts.

Canonical raw record (what ``Source.__getitem__`` returns for most sources, and what ``--mode prepare``
stores in ArrayRecord shards): a dict that is cheap to pickle and never raises on bad data (decode does)::

    seg: {"task": "seg", "key", "source", "image": bytes | None, "target": bytes | None}   # encoded JPEG/PNG
    vqa: {"task": "vqa", "key", "source", "images": [bytes | None, ...], "turns": [...] | None}

``None`` stands for a file that could not be read (missing), so that decode can raise the right reason.
"""

from __future__ import annotations

import io
import json
import struct
import warnings

import numpy as np
from PIL import Image, ImageFile, ImageOps

from sgt_jax.data import proxy_tasks, records
from sgt_jax.data.records import BadSample

# A decompression-bomb guard that still admits SA-1B-size images (about 2250x1500) and 4k scans.
MAX_IMAGE_PIXELS = 64_000_000


def _looks_truncated(data: bytes) -> bool:
    """True if a JPEG lacks its end-of-image marker or a PNG its IEND chunk (the file was cut short)."""
    tail = data[-4096:].rstrip(b"\x00")
    if data[:2] == b"\xff\xd8":
        return not tail.endswith(b"\xff\xd9") and b"\xff\xd9" not in tail
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in tail
    return False


def decode_rgb(data: bytes | None, what: str, key: str, missing_reason: str = "missing_image") -> np.ndarray:
    """Encoded image bytes -> uint8 [H, W, 3] RGB, as displayed: the EXIF orientation is applied
    (``ImageOps.exif_transpose``; a phone JPEG with Orientation=6 is stored sideways) to images and masks
    alike, so a mask pairs with the image as a viewer shows it. Transparent images are composited on white
    (as BAGEL's ``pil_img2rgb``). Raises BadSample: ``missing_reason`` (no bytes), truncated_image,
    corrupt_image."""
    if data is None:
        raise BadSample(missing_reason, f"{key}: {what} not found")
    if not data:
        raise BadSample("truncated_image", f"{key}: {what} is empty (0 bytes)")
    if ImageFile.LOAD_TRUNCATED_IMAGES and _looks_truncated(data):
        # Someone switched PIL to accept truncated files; we still refuse them.
        raise BadSample("truncated_image", f"{key}: {what} is cut short")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as img:
                if img.width * img.height > MAX_IMAGE_PIXELS:
                    raise BadSample("corrupt_image", f"{key}: {what} is {img.width}x{img.height}, over "
                                                     f"{MAX_IMAGE_PIXELS} pixels")
                img.load()
                ImageOps.exif_transpose(img, in_place=True)
                rgb = to_rgb(img)
    except BadSample:
        raise
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombWarning, Image.DecompressionBombError,
            EOFError, struct.error) as err:  # struct.error: a malformed EXIF block
        reason = "truncated_image" if _looks_truncated(data) or "truncated" in str(err) else "corrupt_image"
        raise BadSample(reason, f"{key}: {what}: {type(err).__name__}: {err}") from None
    return np.asarray(rgb, dtype=np.uint8)


MASK_SIZE_POLICIES = ("skip", "resize_nearest")


def check_mask_policy(policy: str) -> str:
    if policy not in MASK_SIZE_POLICIES:
        raise ValueError(f"config.data.mask_size_mismatch={policy!r}; choose one of {MASK_SIZE_POLICIES}")
    return policy


def fit_mask(target: np.ndarray, hw: tuple[int, int], key: str, policy: str = "skip", what: str = "mask"
             ) -> np.ndarray:
    """``target`` at the image size ``hw``: unchanged when it already is; else BadSample("size_mismatch")
    (policy "skip", the default) or a nearest-neighbour resize (policy "resize_nearest": no blended
    colours, unlike the reference's bicubic resize). ``config.data.mask_size_mismatch`` sets the policy."""
    hw = tuple(int(v) for v in hw)
    if tuple(target.shape[:2]) == hw:
        return target
    if check_mask_policy(policy) == "skip":
        raise BadSample("size_mismatch", f"{key}: image {hw} vs {what} {tuple(target.shape[:2])} "
                                         "(config.data.mask_size_mismatch='skip')")
    return np.asarray(Image.fromarray(target).resize((hw[1], hw[0]), Image.Resampling.NEAREST))


def to_rgb(img: Image.Image) -> Image.Image:
    """RGB with transparency composited on white (BAGEL ``pil_img2rgb``)."""
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA"):
        img = img.convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, img).convert("RGB")
    return img.convert("RGB")


def encode_png(arr: np.ndarray) -> bytes:
    """uint8 [H, W, 3] -> PNG bytes (lossless: used for rendered targets)."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def read_text(path: str, who: str) -> str:
    """A UTF-8 text file's contents; ValueError naming the file and the byte offset when it is not UTF-8."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{who}: {path}: not UTF-8 text (byte {data[err.start:err.start + 1]!r} at offset "
                         f"{err.start}); is it the right file?") from None


def load_json(path: str, who: str):
    """A UTF-8 JSON file, parsed; ValueError naming the file and the position of the first error."""
    try:
        return json.loads(read_text(path, who))
    except json.JSONDecodeError as err:
        raise ValueError(f"{who}: {path}: not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
                         ) from None


def read_bytes(path: str) -> bytes | None:
    """File bytes, or None if the file does not exist (decode turns None into a 'missing_*' BadSample)."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def decode_canonical(raw: dict, proxy_task: str = "segmentation", seed: int = 0,
                     mask_size_mismatch: str = "skip") -> dict:
    """Canonical raw record -> validated sample dict (records.py). Segmentation samples are turned into the
    configured proxy task (sgt_jax/data/proxy_tasks.py); VQA samples pass unchanged. A mask of another size
    than its image is handled by ``fit_mask`` with the ``mask_size_mismatch`` policy."""
    if not isinstance(raw, dict) or raw.get("task") not in ("seg", "vqa"):
        raise BadSample("bad_record", f"not a canonical raw record: {str(raw)[:120]}")
    key, source = raw.get("key") or "?", raw.get("source") or "?"
    if raw["task"] == "seg":
        image = decode_rgb(raw.get("image"), "image", key)
        if proxy_task == "segmentation":
            target = decode_rgb(raw.get("target"), "mask", key, missing_reason="missing_mask")
            target = fit_mask(target, image.shape[:2], key, mask_size_mismatch)
            sample = {"task": "seg", "key": key, "source": source, "image": image, "target": target}
        else:  # the other proxies derive their target from the image alone; the mask is not needed
            sample = proxy_tasks.make_proxy_sample(image, key, source, proxy_task, seed)
        return records.validate(sample)
    turns = raw.get("turns")
    if not isinstance(turns, list):
        raise BadSample("bad_record", f"{key}: 'turns' must be a list, got {type(turns).__name__}")
    images = [decode_rgb(b, f"images[{i}]", key) for i, b in enumerate(raw.get("images") or [])]
    return records.validate({"task": "vqa", "key": key, "source": source, "images": images, "turns": turns})
