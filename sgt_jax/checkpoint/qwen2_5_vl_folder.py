"""A Qwen2.5-VL PyTorch folder (OmniGen2's ``mllm/``, or a stock Qwen2.5-VL-3B-Instruct) <-> sharded parameters.

Folder: ``config.json`` (flat legacy layout with ``vision_config`` inside, or the transformers 5.x layout
with ``text_config`` / ``vision_config``) and ``model.safetensors`` or ``model-0000k-of-0000n.safetensors``
shards, with or without ``model.safetensors.index.json``. Other files (tokenizer, processor configs,
``generation_config.json``) are carried over on export.

Entry points (what the OmniGen2 folder importer calls):

* ``import_qwen2_5_vl(folder, config=None, mesh=None, rules=None)`` -> ``(params, cfg, meta)``: params as
  a nested dict of jax.Arrays sharded by ``mesh``/``rules`` (default: ``config.mesh`` of
  configs/bagel_sgt.py's rules over all devices), each shard read slice by slice from the safetensors;
  ``cfg`` the model config inferred from config.json (compute settings from ``config``); ``meta`` what
  export needs to write the folder back (key layout, per-key dtype and file, the config JSON, extra files).
* ``export_qwen2_5_vl(params, cfg, dest, meta=None)``: the same keys, shapes, dtypes and file split as the
  source (bf16, legacy keys, one file, when there is no meta), streamed one tensor at a time.

Every inconsistency (config.json vs tensor headers, missing / unexpected / mis-shaped keys) is collected
and raised as one ``FolderError`` (one line per problem, naming the tensor) before any tensor byte is read.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field

import jax
import ml_collections

from sgt_jax.checkpoint import streaming
from sgt_jax.checkpoint.qwen2_5_vl_table import LAYOUTS, LM_HEAD, detect_layout, expected_keys, qwen2_5_vl_table
from sgt_jax.checkpoint.safetensors_io import MultiFileReader, StreamingWriter, TensorInfo, numpy_dtype, read_header
from sgt_jax.checkpoint.table import ConversionError, check_keys, check_tree

CONFIG = "config.json"
INDEX = "model.safetensors.index.json"
META_FORMAT = "sgt_jax.qwen2_5_vl/1"


class FolderError(ConversionError):
    def __init__(self, problems, path):
        super().__init__(problems, f"Qwen2.5-VL folder {path}")


@dataclass
class QwenFolder:
    path: str
    config: dict
    header: dict[str, TensorInfo]  # every tensor of every shard
    files: dict[str, str]  # key -> file name (relative)
    extra_files: list[str] = field(default_factory=list)


def open_folder(path: str) -> QwenFolder:
    """config.json and every safetensors header (via the index when there is one); no tensor bytes."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"Qwen2.5-VL folder not found: {path}")
    cfg_path = os.path.join(path, CONFIG)
    if not os.path.isfile(cfg_path):
        raise FolderError([f"missing file: {CONFIG}"], path)
    with open(cfg_path) as f:
        try:
            config = json.load(f)
        except json.JSONDecodeError as err:
            raise FolderError([f"{CONFIG} is not valid JSON: {err}"], path) from err
    names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
    if os.path.isfile(os.path.join(path, INDEX)):
        with open(os.path.join(path, INDEX)) as f:
            weight_map = json.load(f).get("weight_map", {})
        missing = sorted(set(weight_map.values()) - set(names))
        if missing:
            raise FolderError([f"{INDEX} lists {m}, which is not in the folder" for m in missing], path)
        names = sorted(set(weight_map.values()))
    if not names:
        raise FolderError(["no *.safetensors file"], path)
    header, files = {}, {}
    for name in names:
        for k, info in read_header(os.path.join(path, name)).items():
            if k in files:
                raise FolderError([f"tensor {k} is in both {files[k]} and {name}"], path)
            header[k], files[k] = info, name
    extra = sorted(n for n in os.listdir(path)
                   if n not in names and n not in (CONFIG, INDEX) and not n.startswith(".")
                   and os.path.isfile(os.path.join(path, n)))
    return QwenFolder(path, config, header, files, extra)


def _text_json(cj: dict) -> dict:
    return cj.get("text_config") or cj


def _rope(tj: dict) -> dict:
    return tj.get("rope_parameters") or tj.get("rope_scaling") or {}


def infer_config(config_json: dict, base: ml_collections.ConfigDict | None = None, problems=None):
    """Model config from a config.json (either layout); compute settings (dtype, attention, remat) from ``base``
    (default: the ``3b`` config). Missing fields are appended to ``problems`` (or raised)."""
    from sgt_jax.models import qwen2_5_vl as qvl

    own = problems is None
    problems = [] if own else problems
    cfg = copy.deepcopy(base) if base is not None else qvl.config("3b")
    tj, vj = _text_json(config_json), config_json.get("vision_config") or {}

    def get(d, where, *names, kind=int):
        for n in names:
            if n in d and isinstance(d[n], kind) and not isinstance(d[n], bool):
                return d[n]
        problems.append(f"{CONFIG}: {where}'{names[0]}' missing or not {'an integer' if kind is int else 'a number'}")
        return None

    t = dict(hidden_size=get(tj, "", "hidden_size"), num_layers=get(tj, "", "num_hidden_layers"),
             num_heads=get(tj, "", "num_attention_heads"), num_kv_heads=get(tj, "", "num_key_value_heads"),
             intermediate_size=get(tj, "", "intermediate_size"), vocab_size=get(tj, "", "vocab_size"),
             rms_norm_eps=get(tj, "", "rms_norm_eps", kind=(int, float)))
    rope = _rope(tj)
    t["rope_theta"] = rope.get("rope_theta", tj.get("rope_theta"))
    t["mrope_section"] = rope.get("mrope_section")
    if not isinstance(t["rope_theta"], (int, float)):
        problems.append(f"{CONFIG}: 'rope_theta' missing (top level or in rope_parameters / rope_scaling)")
    if not isinstance(t["mrope_section"], list) or len(t["mrope_section"]) != 3:
        problems.append(f"{CONFIG}: 'mrope_section' (in rope_scaling / rope_parameters) missing or not 3 numbers")
    if t["hidden_size"] and t["num_heads"]:
        t["head_dim"] = t["hidden_size"] // t["num_heads"]
    t["tie_word_embeddings"] = bool(config_json.get("tie_word_embeddings", tj.get("tie_word_embeddings", False)))
    v = dict(depth=get(vj, "vision_config.", "depth"), hidden_size=get(vj, "vision_config.", "hidden_size"),
             num_heads=get(vj, "vision_config.", "num_heads"),
             intermediate_size=get(vj, "vision_config.", "intermediate_size"),
             patch_size=get(vj, "vision_config.", "patch_size", "spatial_patch_size"),
             temporal_patch_size=get(vj, "vision_config.", "temporal_patch_size"),
             spatial_merge_size=get(vj, "vision_config.", "spatial_merge_size"),
             window_size=get(vj, "vision_config.", "window_size"),
             out_hidden_size=get(vj, "vision_config.", "out_hidden_size"),
             in_channels=vj.get("in_channels", vj.get("in_chans", 3)),
             fullatt_block_indexes=tuple(vj.get("fullatt_block_indexes") or ()),
             rope_theta=float((vj.get("rope_parameters") or {}).get("rope_theta", 10000.0)))
    if own and problems:
        raise ValueError("\n  ".join(["config.json does not describe a Qwen2.5-VL model:"] + problems))
    if not problems:
        t["rope_theta"], t["rms_norm_eps"] = float(t["rope_theta"]), float(t["rms_norm_eps"])
        t["mrope_section"] = tuple(int(s) for s in t["mrope_section"])
        cfg.text.update(t)
        cfg.vision.update(v)
        for role, key in (("image", "image_token_id"), ("vision_start", "vision_start_token_id"),
                          ("vision_end", "vision_end_token_id")):
            if isinstance(config_json.get(key), int):
                cfg.tokens[role] = config_json[key]
    return cfg


def check_folder(fold: QwenFolder, base: ml_collections.ConfigDict | None = None):
    """Infer the config and check every header against it; raises ``FolderError`` listing every problem.
    Returns ``(cfg, layout)``. Reads no tensor bytes."""
    problems: list[str] = []
    cfg = infer_config(fold.config, base, problems)
    if problems:
        raise FolderError(problems, fold.path)
    try:
        layout = detect_layout(fold.header)
    except ValueError as err:
        raise FolderError([str(err)], fold.path) from err
    t = cfg.text
    if t.hidden_size % t.num_heads:
        problems.append(f"{CONFIG}: hidden_size {t.hidden_size} is not divisible by num_attention_heads {t.num_heads}")
    if sum(t.mrope_section) != t.head_dim // 2:
        problems.append(f"{CONFIG}: mrope_section {list(t.mrope_section)} does not sum to "
                        f"head_dim/2 = {t.head_dim // 2}")
    actual = {k: v.shape for k, v in fold.header.items()}
    for line in check_keys(expected_keys(cfg, layout, with_lm_head=LM_HEAD in actual), actual, "the safetensors"):
        if line.startswith("wrong shape"):  # "wrong shape in X: key is [..], expected [..]" -> config wording
            key, rest = line.split(": ", 1)[1].split(" is ", 1)
            line = f"{key} has shape {rest.split(', expected')[0]}, {CONFIG} implies{rest.split(', expected')[1]}"
        problems.append(line)
    bad = sorted({v.dtype for v in fold.header.values()} - {"BF16", "F16", "F32"})
    if bad:
        problems.append(f"unsupported tensor dtypes {bad} (expected BF16, F16 or F32)")
    if problems:
        raise FolderError(problems, fold.path)
    return cfg, layout


def config_from_meta(meta: Mapping) -> ml_collections.ConfigDict:
    """The model config recorded by ``import_qwen2_5_vl`` in its ``meta["model"]`` (JSON lists back to tuples)."""
    def tuples(x):
        if isinstance(x, Mapping):
            return {k: tuples(v) for k, v in x.items()}
        return tuple(tuples(v) for v in x) if isinstance(x, list) else x

    return ml_collections.ConfigDict(tuples(dict(meta["model"])))


def _mesh_and_rules(config, mesh, rules):
    from sgt_jax.parallel.mesh import logical_rules, make_mesh

    if config is None:
        from sgt_jax.configs_util import load_config

        config = load_config("configs/bagel_sgt.py:7b")
    mesh = mesh if mesh is not None else make_mesh(config.mesh)
    return mesh, (rules if rules is not None else logical_rules(config))


def import_qwen2_5_vl(folder: str, config: ml_collections.ConfigDict | None = None, mesh=None, rules=None,
                      *, base: ml_collections.ConfigDict | None = None, checked: tuple | None = None):
    """Read a Qwen2.5-VL folder into sharded parameters (see the module doc).

    ``config``: a run config (its ``mesh`` and rules shard the result when ``mesh``/``rules`` are not
    given); ``base``: the MLLM config whose compute settings the inferred config keeps (default:
    ``config.model.mllm`` if present, else the ``3b`` config); ``checked``: what ``check(folder, config,
    base=base)`` returned, when the caller has already checked the folder (its headers are not read again)."""
    fold, cfg, meta = checked if checked is not None else check(folder, config, base=base)  # before any tensor
    from sgt_jax.models.qwen2_5_vl import abstract_params

    mesh, rules = _mesh_and_rules(config, mesh, rules)
    abstract = abstract_params(cfg, mesh=mesh, rules=rules)
    table = qwen2_5_vl_table(cfg, meta["layout"])
    check_tree(table, abstract, "the model's parameter tree")
    params: dict = {}
    with MultiFileReader(os.path.join(fold.path, f) for f in sorted(set(fold.files.values()))) as reader:
        streaming.fill_from_table(table, reader, abstract, params)
        meta["bytes_read"] = reader.bytes_read
    return params, cfg, meta


def folder_meta(folder: str, config: ml_collections.ConfigDict | None = None, *,
                base: ml_collections.ConfigDict | None = None) -> dict:
    """The ``meta`` ``import_qwen2_5_vl`` returns (layout, config, dtypes, files, extra files), from the
    headers only: what an export needs to write a folder like ``folder`` (``bytes_read`` is 0)."""
    return check(folder, config, base=base)[2]


def check(folder: str, config: ml_collections.ConfigDict | None = None, *,
          base: ml_collections.ConfigDict | None = None) -> tuple:
    """``(fold, cfg, meta)`` of a checked folder (every problem raised here); no tensor bytes read."""
    fold = open_folder(folder)
    if base is None and config is not None and "model" in config and "mllm" in config.model:
        base = config.model.mllm
    cfg, layout = check_folder(fold, base)
    meta = {"format": META_FORMAT, "layout": layout, "config_json": fold.config,
            "dtypes": {k: v.dtype for k, v in fold.header.items()}, "files": fold.files,
            "source": os.path.abspath(folder), "extra_files": fold.extra_files, "bytes_read": 0,
            "model": cfg.to_dict()}
    return fold, cfg, meta


def config_json(cfg, template: dict | None = None) -> dict:
    """config.json for ``cfg``: the source's own JSON with our dimensions, or a legacy-layout one."""
    t, v = cfg.text, cfg.vision
    out = copy.deepcopy(template) if template else {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_act": "silu",
        "torch_dtype": "bfloat16", "image_token_id": cfg.tokens.image, "vision_start_token_id": cfg.tokens.vision_start,
        "vision_end_token_id": cfg.tokens.vision_end, "rope_scaling": {"type": "mrope"}, "vision_config": {}}
    tj = out.get("text_config") or out
    tj.update({"hidden_size": t.hidden_size, "num_hidden_layers": t.num_layers, "num_attention_heads": t.num_heads,
               "num_key_value_heads": t.num_kv_heads, "intermediate_size": t.intermediate_size,
               "vocab_size": t.vocab_size, "rms_norm_eps": t.rms_norm_eps})
    rope_key = "rope_parameters" if "rope_parameters" in tj else "rope_scaling"
    tj.setdefault(rope_key, {})["mrope_section"] = list(t.mrope_section)
    if rope_key == "rope_parameters" or "rope_theta" in tj[rope_key]:
        tj[rope_key]["rope_theta"] = t.rope_theta
    else:
        tj["rope_theta"] = t.rope_theta
    out["tie_word_embeddings"] = t.tie_word_embeddings
    out.setdefault("vision_config", {}).update({
        "depth": v.depth, "hidden_size": v.hidden_size, "num_heads": v.num_heads,
        "intermediate_size": v.intermediate_size, "patch_size": v.patch_size,
        "temporal_patch_size": v.temporal_patch_size, "spatial_merge_size": v.spatial_merge_size,
        "window_size": v.window_size, "out_hidden_size": v.out_hidden_size,
        "fullatt_block_indexes": list(v.fullatt_block_indexes)})
    return out


def export_qwen2_5_vl(params: Mapping, cfg, dest: str, meta: Mapping | None = None, *, layout: str | None = None,
                      dtype: str = "BF16") -> str:
    """Write ``params`` as a Qwen2.5-VL folder at ``dest`` (see the module doc). Without ``meta``: ``layout``
    (default legacy) keys, ``dtype`` tensors, one ``model.safetensors``, a synthesised config.json. Only
    process 0 writes; every process must call this (gathers)."""
    meta = dict(meta or {})
    layout = layout or meta.get("layout", "legacy")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; choose one of {sorted(LAYOUTS)}")
    table = qwen2_5_vl_table(cfg, layout)
    check_tree(table, params, "parameters to export")
    dtypes, files = dict(meta.get("dtypes") or {}), dict(meta.get("files") or {})
    keys = expected_keys(cfg, layout, with_lm_head=LM_HEAD in files)
    by_file: dict[str, dict[str, TensorInfo]] = {}
    for k, shape in keys.items():
        by_file.setdefault(files.get(k, "model.safetensors"), {})[k] = TensorInfo(dtypes.get(k, dtype), shape)
    writer_proc = jax.process_index() == 0
    if writer_proc:
        os.makedirs(dest, exist_ok=True)
    writers = {n: StreamingWriter(os.path.join(dest, n), s, {"format": "pt"}) if writer_proc else None
               for n, s in by_file.items()}
    where = {k: n for n, s in by_file.items() for k in s}
    try:
        for e in table:
            leaf = params
            for p in e.path:
                leaf = leaf[p]
            for i, key in zip([None] if e.layers is None else range(e.layers), e.torch_keys()):
                arr = e.to_torch(streaming.to_host(leaf, i))
                keys_out = [key] + ([LM_HEAD] if LM_HEAD in where and key.endswith("embed_tokens.weight") else [])
                for k in keys_out:
                    w = writers[where[k]]
                    if w is not None:
                        w.write(k, arr.astype(numpy_dtype(by_file[where[k]][k].dtype)))
    except BaseException:
        for w in writers.values():
            if w is not None:
                w.abort()
        raise
    if writer_proc:
        for w in writers.values():
            w.close()
        if len(by_file) > 1:
            total = sum(i.nbytes for s in by_file.values() for i in s.values())
            with open(os.path.join(dest, INDEX), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(where.items()))}, f, indent=2)
        with open(os.path.join(dest, CONFIG), "w") as f:
            json.dump(config_json(cfg, meta.get("config_json")), f, indent=2)
        src = meta.get("source")
        for name in meta.get("extra_files") or []:
            p = os.path.join(src or "", name)
            if src and os.path.isfile(p) and not os.path.exists(os.path.join(dest, name)):
                shutil.copy2(p, os.path.join(dest, name))
    return dest

