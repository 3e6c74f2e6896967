"""An OmniGen2 pipeline folder (the released ``OmniGen2/OmniGen2`` layout) <-> sharded parameters.

Layout (official pipeline modules, VectorSpaceLab/OmniGen2 ``pipeline_omnigen2.py``):
``transformer/`` (``config.json`` + ``diffusion_pytorch_model.safetensors``, or shards
``diffusion_pytorch_model-0000i-of-0000n.safetensors`` with their ``.index.json``), ``vae/`` (a diffusers
``AutoencoderKL`` with the FLUX config: ``config.json`` + ``diffusion_pytorch_model.safetensors``),
``scheduler/scheduler_config.json``, ``mllm/`` (Qwen2.5-VL, transformers ``save_pretrained``), and
optional ``processor/`` and ``model_index.json``.

* ``open_folder`` reads JSON files and safetensors *headers* only, and refuses (``FolderError``, one line
  per problem) a folder with a missing subfolder or file, a config that disagrees with its tensors, or
  unexpected / missing / mis-shaped keys, before any tensor is read.
* ``import_folder`` fills the DiT slice by slice into sharded arrays (``streaming.fill_from_table`` over a
  ``MultiFileReader``) and converts the VAE through the FLUX VAE's diffusers-naming import.
  ``mllm/`` (Qwen2.5-VL) goes through ``qwen2_5_vl_folder.import_qwen2_5_vl`` into ``params["mllm"]``;
  its config.json and headers are checked by ``open_folder`` with the other subfolders.
* ``export_folder`` writes ``transformer/`` back with the source's exact keys, shapes, dtypes and shard
  files, ``vae/`` in diffusers naming with the source's keys and dtypes, ``mllm/`` through
  ``qwen2_5_vl_folder.export_qwen2_5_vl`` (the source's keys, dtypes and file split, its tokenizer /
  processor / generation files copied), and copies the other subfolders and files.
"""

from __future__ import annotations

import copy
import glob
import json
import logging
import os
import shutil
import time
from contextlib import nullcontext
from dataclasses import dataclass, field

import jax
import ml_collections
import numpy as np

from sgt_jax.checkpoint import omnigen2_table as table_lib
from sgt_jax.checkpoint import qwen2_5_vl_folder as qwen_folder
from sgt_jax.checkpoint import streaming, vision_tables
from sgt_jax.checkpoint.folder import infer_vae
from sgt_jax.checkpoint.safetensors_io import (MultiFileReader, StreamingWriter, TensorInfo, numpy_dtype,
                                               read_header, write_all)
from sgt_jax.checkpoint.run_config import default_config, jsonable, mesh_and_rules
from sgt_jax.checkpoint.table import ConversionError, check_keys, check_tree, expected_shapes

log = logging.getLogger(__name__)

SUBFOLDERS = ("transformer", "vae", "scheduler", "mllm")
WEIGHTS = "diffusion_pytorch_model"
KIND = "omnigen2_folder"


class FolderError(ConversionError):
    def __init__(self, problems, path):
        super().__init__(problems, f"OmniGen2 folder {path}")


def is_omnigen2_folder(path: str) -> bool:
    """A folder's family from its layout: OmniGen2 has ``transformer/`` and ``mllm/`` (or a
    ``model_index.json`` naming an OmniGen2 pipeline); BAGEL has ``llm_config.json``."""
    if os.path.isfile(os.path.join(path, "model_index.json")):
        with open(os.path.join(path, "model_index.json")) as f:
            try:
                if "OmniGen2" in str(json.load(f).get("_class_name", "")):
                    return True
            except json.JSONDecodeError:
                pass
    return os.path.isdir(os.path.join(path, "transformer")) and os.path.isdir(os.path.join(path, "mllm"))


@dataclass
class OmniGen2Folder:
    path: str
    dit_json: dict
    vae_json: dict
    dit_files: list[str]  # absolute paths of the transformer safetensors files
    dit_header: dict[str, TensorInfo]
    dit_file_of: dict[str, str]  # key -> file name
    vae_path: str
    vae_header: dict[str, TensorInfo]
    mllm_checked: tuple  # qwen2_5_vl_folder.check of mllm/: (folder, config, meta), read once
    extra: list[str] = field(default_factory=list)

    @property
    def mllm_layout(self) -> str:
        """The Qwen2.5-VL key layout of mllm/ ("legacy" / "current")."""
        return self.mllm_checked[2]["layout"]


def _json(path: str, problems: list[str], name: str):
    if not os.path.isfile(path):
        problems.append(f"missing file: {name}")
        return None
    with open(path) as f:
        try:
            return json.load(f)
        except json.JSONDecodeError as err:
            problems.append(f"{name} is not valid JSON: {err}")
            return None


def _dit_files(path: str, problems: list[str]) -> list[str]:
    tdir = os.path.join(path, "transformer")
    single = os.path.join(tdir, WEIGHTS + ".safetensors")
    shards = sorted(glob.glob(os.path.join(tdir, WEIGHTS + "-*-of-*.safetensors")))
    index = os.path.join(tdir, WEIGHTS + ".safetensors.index.json")
    if os.path.isfile(single):
        return [single]
    if not shards:
        problems.append(f"missing file: transformer/{WEIGHTS}.safetensors (or its shards)")
        return []
    idx = _json(index, problems, f"transformer/{WEIGHTS}.safetensors.index.json")
    if idx is not None:
        named = sorted({os.path.join(tdir, f) for f in idx.get("weight_map", {}).values()})
        if named != shards:
            problems.append(f"transformer/{WEIGHTS}.safetensors.index.json names files "
                            f"{[os.path.basename(f) for f in named]}, the folder holds "
                            f"{[os.path.basename(f) for f in shards]}")
    return shards


def vae_config(vae_json: dict, header, problems: list[str], base=None) -> ml_collections.ConfigDict:
    """``vae/config.json`` (diffusers ``AutoencoderKL``) checked against its header -> FluxVAE config."""
    w = "vae/config.json"
    got = infer_vae(header, "diffusers", problems, "vae/" + WEIGHTS + ".safetensors")
    c = ml_collections.ConfigDict(dict(in_channels=3, out_channels=3, ch=128, ch_mult=(1, 2, 4, 4), num_res_blocks=2,
                                       z_channels=16, num_groups=32, scale_factor=0.3611, shift_factor=0.1159))
    if base is not None:
        c.update(base.to_dict())
    boc = vae_json.get("block_out_channels")
    want = {}
    if not (isinstance(boc, list) and boc and all(isinstance(b, int) and b % boc[0] == 0 for b in boc)):
        problems.append(f"{w}: block_out_channels must be a list of multiples of its first entry, got {boc!r}")
    else:
        want.update(ch=boc[0], ch_mult=tuple(b // boc[0] for b in boc))
    for ours, theirs in (("num_res_blocks", "layers_per_block"), ("z_channels", "latent_channels"),
                         ("in_channels", "in_channels"), ("out_channels", "out_channels"),
                         ("num_groups", "norm_num_groups")):
        v = vae_json.get(theirs)
        if not isinstance(v, int):
            problems.append(f"{w}: {theirs} missing or not an integer (got {v!r})")
        else:
            want[ours] = v
    for ours, theirs in (("scale_factor", "scaling_factor"), ("shift_factor", "shift_factor")):
        v = vae_json.get(theirs)
        if not isinstance(v, (int, float)):
            problems.append(f"{w}: {theirs} missing or not a number (got {v!r})")
        else:
            want[ours] = float(v)
    for k, v in got.items():
        if k in want and want[k] != v:
            problems.append(f"{w} gives {k}={want[k]}, the tensors have {v}")
    c.update(want)
    return c


def _check_mllm(path: str, base_mllm, problems: list[str]):
    """``mllm/``'s config.json and headers checked: ``qwen2_5_vl_folder.check``'s ``(folder, config, meta)``,
    or None with its problems (prefixed ``mllm/``) added to ``problems``."""
    try:
        return qwen_folder.check(os.path.join(path, "mllm"), base=base_mllm)
    except ConversionError as err:
        problems.extend(f"mllm/{p}" if p.startswith(qwen_folder.CONFIG) else f"mllm/: {p}" for p in err.problems)
        return None


def open_folder(path: str, base_dit=None, base_vae=None, base_mllm=None) -> tuple[
        OmniGen2Folder, ml_collections.ConfigDict, ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """Read the configs and headers, infer and check everything; ``FolderError`` lists every problem.
    Returns ``(folder, cfg_dit, cfg_vae, cfg_mllm)``."""
    if not os.path.isdir(path):
        raise FileNotFoundError(f"OmniGen2 folder not found: {path}")
    problems = [f"missing subfolder: {s}/" for s in SUBFOLDERS if not os.path.isdir(os.path.join(path, s))]
    if problems:
        raise FolderError(problems, path)
    dit_json = _json(os.path.join(path, "transformer", "config.json"), problems, "transformer/config.json")
    vae_json = _json(os.path.join(path, "vae", "config.json"), problems, "vae/config.json")
    _json(os.path.join(path, "scheduler", "scheduler_config.json"), problems, "scheduler/scheduler_config.json")
    files = _dit_files(path, problems)
    vae_path = os.path.join(path, "vae", WEIGHTS + ".safetensors")
    if not os.path.isfile(vae_path):
        problems.append(f"missing file: vae/{WEIGHTS}.safetensors")
    if problems:
        raise FolderError(problems, path)
    header, file_of = {}, {}
    for f in files:
        for k, v in read_header(f).items():
            if k in header:
                problems.append(f"transformer: tensor {k} is in both {file_of[k]} and {os.path.basename(f)}")
            header[k], file_of[k] = v, os.path.basename(f)
    vae_header = read_header(vae_path)

    cfg_dit = None
    try:
        cfg_dit = table_lib.config_from_json(dit_json, base_dit, "transformer/config.json")
    except ValueError as err:
        problems.extend(str(err).splitlines())
    if cfg_dit is not None:
        problems += check_keys(expected_shapes(table_lib.dit_table(cfg_dit)), {k: v.shape for k, v in header.items()},
                               "transformer/ (vs its config.json)")
    bad = sorted({v.dtype for v in header.values()} - {"BF16", "F16", "F32"})
    if bad:
        problems.append(f"transformer/: unsupported dtypes {bad} (expected floating point)")
    vae_problems: list[str] = []
    cfg_vae = vae_config(vae_json, vae_header, vae_problems, base_vae)
    if not vae_problems:
        try:
            vision_tables.check_vae_torch_shapes({k: v.shape for k, v in vae_header.items()}, cfg_vae)
        except ValueError as err:
            vae_problems.append(f"vae/{WEIGHTS}.safetensors: " + " ".join(str(err).split()))
    problems += vae_problems
    mllm_checked = _check_mllm(path, base_mllm, problems)
    if problems:
        raise FolderError(problems, path)
    extra = sorted(n for n in os.listdir(path) if n not in ("transformer", "vae", "mllm") and not n.startswith("."))
    fold = OmniGen2Folder(path, dit_json, vae_json, files, header, file_of, vae_path, vae_header, mllm_checked,
                          extra)
    cfg_mllm = mllm_checked[1]
    return fold, cfg_dit, cfg_vae, cfg_mllm


def _single_dtype(header) -> str:
    d = sorted({v.dtype for v in header.values()})
    return d[0] if len(d) == 1 else "mixed:" + ",".join(d)


def abstract_params(cfg_dit, cfg_vae, cfg_mllm, mesh, rules) -> dict:
    """``{"dit", "vae", "mllm"}`` ShapeDtypeStructs with shardings; allocates nothing."""
    from flax import nnx

    from sgt_jax.models.flux_vae import FluxVAE
    from sgt_jax.models.omnigen2_dit import OmniGen2DiT
    from sgt_jax.models.qwen2_5_vl import abstract_params as qwen_abstract_params
    from sgt_jax.parallel.sharding import abstract_params_of

    return {"dit": abstract_params_of(lambda: OmniGen2DiT(cfg_dit, rngs=nnx.Rngs(0)), mesh=mesh, rules=rules),
            "vae": abstract_params_of(lambda: FluxVAE(cfg_vae, rngs=nnx.Rngs(0)), mesh=mesh, rules=rules),
            "mllm": qwen_abstract_params(cfg_mllm, mesh=mesh, rules=rules)}


def configs_from_meta(meta) -> tuple[ml_collections.ConfigDict, ml_collections.ConfigDict, ml_collections.ConfigDict]:
    """``(cfg_dit, cfg_vae, cfg_mllm)`` as recorded in params_meta.json by ``import_folder``."""
    if not isinstance(meta.get("mllm"), dict):
        raise ValueError("params_meta.json has no imported mllm/ (imported before the MLLM was converted): "
                         "import the OmniGen2 folder again")
    cfg_dit = ml_collections.ConfigDict(meta["model"]["dit"])
    cfg_vae = ml_collections.ConfigDict(meta["model"]["vae"])
    for c, keys in ((cfg_dit, ("axes_dim_rope", "axes_lens")), (cfg_vae, ("ch_mult",))):
        for k in keys:
            c[k] = tuple(c[k])
    return cfg_dit, cfg_vae, qwen_folder.config_from_meta(meta["mllm"])


def import_folder(source: str, config=None, mesh=None, rules=None):
    """OmniGen2 folder -> ``(params, cfg_dit, cfg_vae, meta)``; ``params = {"dit", "vae", "mllm"}``
    of sharded jax.Arrays over ``mesh`` with the logical ``rules`` (default: ``config.mesh``). The MLLM's
    config is ``configs_from_meta(meta)[2]`` (compute settings from ``config.model.mllm`` when present)."""
    fold, cfg_dit, cfg_vae, cfg_mllm, meta, base_mllm, mllm_checked = _checked(source, config)  # problems first
    if mesh is None:
        mesh, rules = mesh_and_rules(config if config is not None and "mesh" in config else default_config())
    abstract = abstract_params(cfg_dit, cfg_vae, cfg_mllm, mesh, rules)
    table = table_lib.dit_table(cfg_dit)
    check_tree(table, abstract["dit"], "the model's parameter tree")
    t0 = time.time()
    params = {"dit": {}}
    with MultiFileReader(fold.dit_files) as reader:
        streaming.fill_from_table(table, reader, abstract["dit"], params["dit"])
        dit_bytes = reader.bytes_read
    with MultiFileReader([fold.vae_path]) as reader:  # small and fixed-size: converted in memory
        vae_sd = {k: reader.read(k) for k in sorted(reader.keys())}
    params["vae"] = streaming.place_numpy(vision_tables.vae_state_dict_to_params(vae_sd, cfg_vae), abstract["vae"])
    params["mllm"], _, mllm_meta = qwen_folder.import_qwen2_5_vl(os.path.join(source, "mllm"), config, mesh, rules,
                                                                 base=base_mllm, checked=mllm_checked)
    meta["mllm"] = jsonable(mllm_meta)
    meta["import"] = {"seconds": round(time.time() - t0, 3), "bytes_read_transformer": dit_bytes,
                      "bytes_read_mllm": mllm_meta["bytes_read"],
                      "process_count": jax.process_count(), "devices": jax.device_count()}
    return params, cfg_dit, cfg_vae, meta


def folder_meta(source: str, config=None) -> dict:
    """The ``meta`` ``import_folder`` records (configs, key layout, dtypes, shard files, extra files), from
    the folder's configs and safetensors headers only (no ``import`` entry): what ``export_folder`` needs to
    write a folder like ``source``, for a run that started from the folder itself rather than from an
    imported workdir."""
    return _checked(source, config)[4]


def _checked(source: str, config):
    """Open and check ``source`` (every problem, no tensor bytes): ``(fold, cfg_dit, cfg_vae, cfg_mllm, meta,
    base_mllm, mllm_checked)``; ``meta`` holds everything but the ``import`` entry; ``mllm_checked`` is
    ``qwen2_5_vl_folder.check`` of ``mllm/`` (the import reuses it rather than reading the headers again)."""
    # An OmniGen2 run config may carry model.dit / model.vae / model.mllm.
    model_cfg = config.model if config is not None and "model" in config else {}
    base_dit, base_vae, base_mllm = (model_cfg[k] if k in model_cfg else None for k in ("dit", "vae", "mllm"))
    fold, cfg_dit, cfg_vae, cfg_mllm = open_folder(source, base_dit, base_vae, base_mllm)
    table = table_lib.dit_table(cfg_dit)
    meta = {
        "format": "sgt_jax.params/1",
        "family": "omnigen2",
        "model": {"dit": jsonable(cfg_dit), "vae": jsonable(cfg_vae)},
        "layout": {"scan_axis": 0, "stacked": sorted("dit/" + "/".join(e.path) for e in table if e.layers),
                   "param_dtype": str(cfg_dit.param_dtype)},
        "source": {"path": os.path.abspath(source), "kind": KIND, "dit_config": fold.dit_json,
                   "vae_config": fold.vae_json, "dit_weight_map": fold.dit_file_of,
                   "dit_dtypes": {k: v.dtype for k, v in fold.dit_header.items()},
                   "vae_keys": {k: [v.dtype, list(v.shape)] for k, v in fold.vae_header.items()},
                   "extra": fold.extra},
        # config, key layout, per-key dtype and file, extra files (qwen2_5_vl_folder); a copy, since the
        # import adds bytes_read to the check's own meta
        "mllm": jsonable(copy.deepcopy(fold.mllm_checked[2])),
    }
    return fold, cfg_dit, cfg_vae, cfg_mllm, meta, base_mllm, fold.mllm_checked


def export_folder(params, cfg_dit, cfg_vae, dest: str, meta) -> str:
    """Write ``params`` as an OmniGen2 folder at ``dest``: ``transformer/`` with the source's keys, dtypes
    and shard files (bf16, one file, when unknown), ``vae/`` in diffusers naming, ``mllm/`` through
    ``export_qwen2_5_vl`` (config from ``meta["mllm"]``), the other subfolders and files copied from the
    source. Every process must call this; process 0 writes."""

    src = meta.get("source", {})
    cfg_mllm = configs_from_meta(meta)[2]
    table = table_lib.dit_table(cfg_dit)
    check_tree(table, params["dit"], "parameters to export")
    writer_proc = jax.process_index() == 0
    tdir, vdir = os.path.join(dest, "transformer"), os.path.join(dest, "vae")
    if writer_proc:
        os.makedirs(tdir, exist_ok=True)
        os.makedirs(vdir, exist_ok=True)
    keys = expected_shapes(table)
    file_of = src.get("dit_weight_map") or {k: WEIGHTS + ".safetensors" for k in keys}
    dtypes = src.get("dit_dtypes") or {}
    if set(file_of) != set(keys):
        raise ValueError("the recorded transformer weight map does not match the model's keys")
    by_file: dict[str, list[str]] = {}
    for k, f in file_of.items():
        by_file.setdefault(f, []).append(k)
    for fname, fkeys in sorted(by_file.items()):
        specs = {k: TensorInfo(dtypes.get(k, "BF16"), keys[k]) for k in fkeys}
        out = StreamingWriter(os.path.join(tdir, fname), specs, {"format": "pt"}) if writer_proc else nullcontext()
        with out as writer:  # a failed write removes the partial file
            streaming.write_table(table, params["dit"], writer, lambda k: specs[k].dtype, only=set(fkeys))
    vae = jax.tree.map(streaming.to_host, dict(params["vae"]))
    qwen_folder.export_qwen2_5_vl(params["mllm"], cfg_mllm, os.path.join(dest, "mllm"), meta["mllm"])
    if writer_proc:
        if len(by_file) > 1:
            total = sum(TensorInfo(dtypes.get(k, "BF16"), s).nbytes for k, s in keys.items())
            with open(os.path.join(tdir, WEIGHTS + ".safetensors.index.json"), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(file_of.items()))}, f, indent=2)
        with open(os.path.join(tdir, "config.json"), "w") as f:
            json.dump(table_lib.config_to_json(cfg_dit, src.get("dit_config")), f, indent=2)
        _write_vae(vae, cfg_vae, vdir, src)
        _copy_rest(src, dest)
    return dest


def _write_vae(vae_params, cfg_vae, vdir: str, src) -> None:
    """The VAE in diffusers naming with the source's keys and dtypes (FLUX-named rows renamed back)."""
    flux = vision_tables.params_to_vae_state_dict(vae_params, cfg_vae)
    layout = src.get("vae_keys")
    if not layout:
        raise ValueError("export needs the source VAE's key list (params_meta.json source.vae_keys)")
    levels = len(cfg_vae.ch_mult)
    out = []
    for k, (code, shape) in sorted(layout.items()):
        fk = vision_tables.diffusers_vae_key_to_flux(k, levels)
        out.append((k, np.asarray(flux[fk]).reshape(shape).astype(numpy_dtype(code))))
    write_all(os.path.join(vdir, WEIGHTS + ".safetensors"), out, {"format": "pt"})
    cfg = dict(src.get("vae_config") or {})
    with open(os.path.join(vdir, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)


def _copy_rest(src, dest: str) -> None:
    """scheduler/, processor/, model_index.json (everything but transformer/, vae/, mllm/) from the source
    folder, when it still exists."""
    path = src.get("path")
    if not path or not os.path.isdir(path):
        log.warning("source folder %s is gone: copy scheduler/ and processor/ by hand", path)
        return
    for name in src.get("extra", []):
        s, d = os.path.join(path, name), os.path.join(dest, name)
        if os.path.exists(d):
            continue
        if os.path.isdir(s):
            shutil.copytree(s, d)
        elif os.path.isfile(s):
            shutil.copy2(s, d)
