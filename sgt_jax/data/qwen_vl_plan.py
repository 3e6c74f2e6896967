"""Host-side (numpy) index rules of Qwen2.5-VL: the vision patch-stream layout and the M-RoPE positions.

Everything the model needs beyond pixels and token ids is computed here, once, on the host, as small
integer arrays of static size, so the jitted model never sees a data-dependent shape.

Vision pack (``vision_pack``). Qwen2.5-VL's vision tower (transformers ``modeling_qwen2_5_vl.py``,
``Qwen2_5_VisionTransformerPretrainedModel``) runs most blocks with attention inside windows of
``window_size`` pixels (``window_size / patch_size / merge`` merged tokens per side) and the blocks
listed in ``fullatt_block_indexes`` over each whole image. It reorders the merge units (2x2 patch
groups) of every image into window order before the blocks, and puts the merged tokens back into
raster order after the patch merger. We keep that physical layout: the pack holds the patches of
several images in *window order*, so each window is contiguous (the chunked attention then skips the
key blocks a window cannot see), and two per-patch ids drive the attention mask:

* ``window_id`` [P]: the window a patch belongs to (unique over the pack; pad -1), for windowed blocks;
* ``image_id`` [P]: the image (one id per temporal frame group; pad -1), for full-attention blocks.

``pos_hw`` [P, 2] is each patch's (row, col) in its image's patch grid (the 2-D rotary input) and
``source`` [P] the row of the processor's ``pixel_values`` (raster merge-unit order, images
concatenated) that lands in each slot (-1 for pad slots). ``merged_index`` [N] maps every merged token,
in the LLM's order (images in order, raster order inside an image), to its row in the window-ordered
merged stream: the reverse permutation, applied as a gather.

M-RoPE (``mrope_positions``): transformers' ``get_rope_index`` for images. Text tokens get the same
position on all three axes, counting up; the tokens of an image (``t·h·w / merge²`` consecutive
``image_token_id`` tokens) get (start + t, start + row, start + col) on the (temporal, height, width)
axes, and the text after it continues at start + max(t, h/merge, w/merge).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _grids(grid_thw) -> np.ndarray:
    g = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
    if (g <= 0).any():
        raise ValueError(f"image_grid_thw must be positive, got {g.tolist()}")
    return g


def image_window_units(grid_thw: Sequence[int], merge: int, window_merged: int) -> list[np.ndarray]:
    """One image's merge units (indices in raster (t, h/merge, w/merge) order), grouped by window,
    windows in transformers' order (frame, window row, window column; units row-major inside)."""
    t, h, w = (int(x) for x in grid_thw)
    if h % merge or w % merge:
        raise ValueError(f"image grid {h}x{w} patches is not a multiple of spatial_merge_size {merge}")
    lh, lw = h // merge, w // merge
    units = np.arange(t * lh * lw).reshape(t, lh, lw)
    out = []
    for f in range(t):
        for r0 in range(0, lh, window_merged):
            for c0 in range(0, lw, window_merged):
                out.append(units[f, r0:r0 + window_merged, c0:c0 + window_merged].reshape(-1))
    return out


def vision_pack(image_grid_thw, *, patch_size: int, spatial_merge_size: int, window_size: int,
                max_patches: int | None = None) -> dict[str, np.ndarray]:
    """The window-ordered layout of the patches of several images in one stream (see the module doc).

    Args:
      image_grid_thw: [N, 3] (t, h, w) patch grids of the images, in prompt order.
      max_patches: static stream length P (a multiple of merge²); None = exactly the patches needed.
    Returns a dict of int32 arrays ``source``, ``image_id``, ``window_id`` [P], ``pos_hw`` [P, 2] and
    ``merged_index`` [N_merged] (N_merged = real patches / merge²).
    """
    grids = _grids(image_grid_thw)
    m = int(spatial_merge_size)
    unit = m * m
    window_merged = int(window_size) // m // int(patch_size)
    if window_merged < 1:
        raise ValueError(f"window_size {window_size} is smaller than one merged token "
                         f"({m} x {patch_size} pixels)")
    total = int(np.prod(grids, axis=1).sum())
    p = total if max_patches is None else int(max_patches)
    if p % unit:
        raise ValueError(f"max_patches {p} is not a multiple of spatial_merge_size² = {unit}")
    if total > p:
        raise ValueError(f"{len(grids)} image(s) need {total} patches, the vision pack holds {p}")
    source = np.full(p, -1, np.int32)
    image_id = np.full(p, -1, np.int32)
    window_id = np.full(p, -1, np.int32)
    pos_hw = np.zeros((p, 2), np.int32)
    merged_index = np.zeros(total // unit, np.int32)
    slot = 0  # next free merge-unit slot of the pack
    unit_base = 0  # first merge unit of the current image in the processor's (raster) order
    n_window = n_frame = 0
    for t, h, w in grids.tolist():
        # (row, col) of every patch in processor order: merge units raster, 2x2 inside (block-major).
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blk = lambda a: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)  # noqa: E731
        hw = np.tile(np.stack([blk(rows), blk(cols)], axis=-1), (t, 1))
        per_frame = (h // m) * (w // m)
        for win in image_window_units((t, h, w), m, window_merged):
            k = len(win)
            src_units = unit_base + win
            rows_src = (src_units[:, None] * unit + np.arange(unit)).reshape(-1)
            sl = slice(slot * unit, (slot + k) * unit)
            source[sl] = rows_src
            pos_hw[sl] = hw[rows_src - unit_base * unit]
            window_id[sl] = n_window
            image_id[sl] = n_frame + np.repeat(win // per_frame, unit)
            merged_index[src_units] = slot + np.arange(k)
            slot += k
            n_window += 1
        unit_base += t * per_frame
        n_frame += t
    return dict(source=source, image_id=image_id, window_id=window_id, pos_hw=pos_hw, merged_index=merged_index)


def gather_patches(pixel_values: np.ndarray, source: np.ndarray) -> np.ndarray:
    """Processor ``pixel_values`` [N_patches, D] -> the pack's patch rows [P, D] (pad rows 0)."""
    pv = np.asarray(pixel_values, np.float32)
    if source.max(initial=-1) >= len(pv):
        raise ValueError(f"the vision pack needs {source.max() + 1} patch rows, pixel_values has {len(pv)}")
    return np.where((source >= 0)[:, None], pv[np.maximum(source, 0)], 0).astype(np.float32)


def mrope_positions(input_ids, image_grid_thw, *, image_token_id: int, spatial_merge_size: int,
                    valid=None) -> tuple[np.ndarray, np.ndarray]:
    """transformers' ``get_rope_index`` for images: positions [3, B, T] and rope deltas [B].

    ``input_ids`` [B, T]; ``image_grid_thw`` [N, 3] for all images of the batch, in order (row by row);
    ``valid`` [B, T] bool (None: all valid). Invalid (pad) tokens get position 0. Runs of consecutive
    image tokens are cut into images by their grids' token counts; a count that does not fit is an
    error. ``delta = max position + 1 - valid length``: the offset of the decode positions."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be [B, T], got shape {ids.shape}")
    valid = np.ones(ids.shape, bool) if valid is None else np.asarray(valid, bool)
    grids = _grids(image_grid_thw) if image_grid_thw is not None and len(image_grid_thw) else np.zeros((0, 3), int)
    m = int(spatial_merge_size)
    out = np.zeros((3,) + ids.shape, np.int64)
    deltas = np.zeros(ids.shape[0], np.int64)
    gi = 0
    for b in range(ids.shape[0]):
        where = np.nonzero(valid[b])[0]
        row = ids[b, where]
        pos = np.zeros((3, len(row)), np.int64)
        cur, i = 0, 0
        while i < len(row):
            if row[i] != image_token_id:
                pos[:, i] = cur
                cur, i = cur + 1, i + 1
                continue
            if gi >= len(grids):
                raise ValueError(f"row {b}: more image-token runs than the {len(grids)} image grids given")
            t, h, w = grids[gi].tolist()
            gi += 1
            lh, lw = h // m, w // m
            n = t * lh * lw
            if i + n > len(row) or (row[i:i + n] != image_token_id).any():
                raise ValueError(f"row {b}: image {gi - 1} (grid {t}x{h}x{w}) needs {n} consecutive image "
                                 f"tokens at position {where[i]}, the prompt has fewer")
            tt, hh, ww = np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
            pos[:, i:i + n] = np.stack([tt.ravel(), hh.ravel(), ww.ravel()]) + cur
            cur += max(t, lh, lw)
            i += n
        out[:, b, where] = pos
        deltas[b] = (pos.max() + 1 if len(row) else 0) - len(row)
    if gi != len(grids):
        raise ValueError(f"{len(grids)} image grids given, the prompts hold {gi} images")
    return out.astype(np.int32), deltas.astype(np.int32)


def vision_token_index(input_ids, merged_index: np.ndarray, *, image_token_id: int, valid=None,
                       row_offset: int = 0) -> np.ndarray:
    """For every token, the row of the (window-ordered, flattened) merged vision stream that replaces its
    embedding, or -1 (text). Image tokens are filled in reading order (row by row), like transformers'
    ``masked_scatter``; ``row_offset`` shifts the rows (several vision packs flattened together)."""
    ids = np.asarray(input_ids)
    valid = np.ones(ids.shape, bool) if valid is None else np.asarray(valid, bool)
    is_img = (ids == image_token_id) & valid
    n = int(is_img.sum())
    if n != len(merged_index):
        raise ValueError(f"the prompts hold {n} image tokens, the images give {len(merged_index)} merged tokens")
    out = np.full(ids.shape, -1, np.int32)
    out[is_img] = np.asarray(merged_index, np.int32) + int(row_offset)
    return out
