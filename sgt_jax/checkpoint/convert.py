"""BAGEL PyTorch weights <-> our parameters: the in-memory API and the ``import`` / ``export`` CLI modes.

In memory (tests, parity checks, small models):
  ``bagel_state_dict_to_params(state_dict, cfg_model)`` -> nested dict of fp32 numpy arrays matching
      ``nnx.state(model, nnx.Param).to_pure_dict()`` for every Bagel parameter except the VAE.
  ``params_to_bagel_state_dict(params, cfg_model, dtype=...)`` -> the BAGEL ``ema.safetensors`` dict
      (exact key names and shapes of the `ema.safetensors` of `ByteDance-Seed/BAGEL-7B-MoT`, sin-cos tables included).
  ``vae_state_dict_to_params`` / ``params_to_vae_state_dict``: the VAE converters
      (sgt_jax/checkpoint/vision_tables.py), re-exported; ``load_vae(folder, cfg_vae)``: the VAE of a folder.

Streaming, sharded (any model size; every process reads only the slices its devices own):
  ``import_folder(source, config)`` -> (params as sharded jax.Arrays, model config, metadata)
  ``export_folder(params, cfg_model, dest, meta)`` writes a folder the official PyTorch code loads.

CLI (sgt_jax/main.py dispatches here):
  python -m sgt_jax.main --mode import --source <BAGEL folder> --workdir <out> [--config ...]
  python -m sgt_jax.main --mode export --workdir <run> --dest <folder> [--step N] [--weights ema|raw]
See docs/conversion.md.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from safetensors import safe_open

from sgt_jax.checkpoint import folder as folder_lib
from sgt_jax.checkpoint import store, streaming, vision_tables
from sgt_jax.checkpoint.run_config import default_config, jsonable, mesh_and_rules
from sgt_jax.checkpoint.llm_tables import heads_table, llm_table, sincos_tables, sincos_value
from sgt_jax.checkpoint.safetensors_io import SliceReader, StreamingWriter, TensorInfo, numpy_dtype, write_all
from sgt_jax.checkpoint.table import (ConversionError, check_keys, check_tree, expected_shapes,
                                      flatten_paths, state_dict_to_tree, tree_to_state_dict)
from sgt_jax.checkpoint.vision_tables import params_to_vae_state_dict, vae_state_dict_to_params
from sgt_jax.checkpoint.vit_table import vit_table
from sgt_jax.models.bagel import abstract_params
from sgt_jax.models.flux_vae import FluxVAE

log = logging.getLogger(__name__)

META_FORMAT = "sgt_jax.params/1"


def bagel_table(cfg_model) -> list:
    """Every row of the Bagel (non-VAE) parameters: LLM, ViT, heads."""
    return llm_table(cfg_model) + vit_table(cfg_model) + heads_table(cfg_model)


def expected_ema_shapes(cfg_model) -> dict[str, tuple[int, ...]]:
    """Every ``ema.safetensors`` key and shape for ``cfg_model`` (sin-cos tables included)."""
    out = expected_shapes(bagel_table(cfg_model))
    for key, (grid, dim) in sincos_tables(cfg_model).items():
        out[key] = (grid * grid, dim)
    return out


# ---- in memory ------------------------------------------------------------------------------------


def bagel_state_dict_to_params(state_dict: Mapping[str, np.ndarray], cfg_model, *, dtype=np.float32) -> dict:
    """BAGEL state dict (numpy arrays, any float dtype incl. bf16) -> nested param dict (no VAE).

    The sin-cos tables may be present (their shape is checked, their values ignored: we recompute
    them) or absent. Raises ``ConversionError`` naming every missing, unexpected or mis-shaped key."""
    actual = {k: tuple(np.shape(v)) for k, v in state_dict.items()}
    problems = check_keys(expected_ema_shapes(cfg_model), actual, "state dict")
    problems = [p for p in problems if not (p.startswith("missing") and any(k in p for k in sincos_tables(cfg_model)))]
    if problems:
        raise ConversionError(problems)
    return state_dict_to_tree(bagel_table(cfg_model), state_dict, dtype=dtype, ignore=sincos_tables(cfg_model))


def params_to_bagel_state_dict(params: Mapping, cfg_model, *, dtype=None) -> dict[str, np.ndarray]:
    """Nested param dict (a ``vae`` subtree, if present, is ignored) -> BAGEL ema state dict.

    ``dtype`` None keeps the params' dtype (the sin-cos tables then come as fp32); pass
    ``ml_dtypes.bfloat16`` for the official file's dtype."""
    tree = {k: v for k, v in params.items() if k != "vae"}
    out = tree_to_state_dict(bagel_table(cfg_model), tree, dtype=dtype)
    for key, (grid, dim) in sincos_tables(cfg_model).items():
        out[key] = sincos_value(grid, dim).astype(np.float32).astype(dtype or np.float32)
    return out


def load_vae(folder: str, cfg_vae) -> FluxVAE:
    """The frozen FLUX VAE with the weights of a BAGEL folder's ``ae.safetensors``.

    Built abstractly (``nnx.eval_shape``) and filled from the file, so no random init runs."""
    path = os.path.join(folder, folder_lib.AE_FILE)
    if not folder or not os.path.exists(path):
        raise FileNotFoundError(f"the VAE weights {path!r} are not there (set config.checkpoint.init_from to a "
                                "BAGEL checkpoint folder)")
    with safe_open(path, framework="flax") as f:  # flax: bf16 files load too (numpy has no bfloat16)
        sd = {k: np.asarray(f.get_tensor(k).astype(jnp.float32)) for k in f.keys()}
    params = vae_state_dict_to_params(sd, cfg_vae)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: FluxVAE(cfg_vae, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state)


# ---- model config, mesh ----------------------------------------------------------------------------


def model_config_from_meta(meta: Mapping) -> ml_collections.ConfigDict:
    """The model config recorded in params_meta.json (tuples restored where the config has them). Top-level
    fields added to the config after that import (e.g. ``pos_table_dtype``) take the current defaults."""
    m = ml_collections.ConfigDict(meta["model"])
    m.vae.ch_mult = tuple(m.vae.ch_mult)
    defaults = default_config().model
    for key in defaults.keys():
        if key not in m:
            m[key] = defaults[key]
    return m


# ---- import ----------------------------------------------------------------------------------------


def check_folder(fold: folder_lib.BagelFolder, cfg_model) -> None:
    """Every header key and shape against the model (before any tensor is read); raises ``FolderError``."""
    ema = {k: v.shape for k, v in fold.ema_header.items()}
    problems = check_keys(expected_ema_shapes(cfg_model), ema, folder_lib.EMA_FILE)
    try:  # FLUX or diffusers naming; lists every VAE problem in one message
        vision_tables.check_vae_torch_shapes({k: v.shape for k, v in fold.ae_header.items()}, cfg_model.vae)
    except ValueError as err:
        problems.append(f"{folder_lib.AE_FILE}: {err}")
    bad_dtype = sorted({v.dtype for v in fold.ema_header.values()} - {"BF16", "F16", "F32"})
    if bad_dtype:
        problems.append(f"{folder_lib.EMA_FILE}: unsupported dtypes {bad_dtype} (expected floating point)")
    if problems:
        raise folder_lib.FolderError(problems, fold.path)


def import_folder(source: str, config: ml_collections.ConfigDict | None = None, *, progress: bool = True):
    """Read a BAGEL folder into sharded parameters.

    Returns ``(params, cfg_model, meta)``: ``params`` a nested dict of jax.Arrays (the Bagel param tree,
    VAE included) sharded by ``config.mesh`` and its rules over all devices; ``cfg_model`` the inferred
    model config; ``meta`` the JSON-able description written to params_meta.json."""
    from tqdm import tqdm

    config = config if config is not None else default_config()
    fold = folder_lib.open_folder(source)
    cfg_model = folder_lib.infer_model_config(fold, config.model)
    diff = folder_lib.architecture_diff(config.model, cfg_model)
    if diff:
        log.warning("architecture taken from %s, not from the config: %s", source, "; ".join(diff))
    check_folder(fold, cfg_model)  # every name/shape problem, before any tensor is read

    mesh, rules = mesh_and_rules(config)
    abstract = abstract_params(cfg_model, mesh=mesh, rules=rules)
    table = bagel_table(cfg_model)
    check_tree(table, {k: v for k, v in abstract.items() if k != "vae"}, "the model's parameter tree")

    t0 = time.time()
    total = sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(abstract))
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="import", disable=not progress or jax.process_index())
    params: dict = {}
    with SliceReader(fold.ema_path) as reader:
        streaming.fill_from_table(table, reader, abstract, params, progress=bar.update)
        ema_bytes = reader.bytes_read
    with SliceReader(fold.ae_path) as reader:  # the VAE is small and fixed-size: convert it in memory
        ae = {k: reader.read(k) for k in sorted(reader.keys())}
        ae_bytes = reader.bytes_read
    vae_tree = vae_state_dict_to_params(ae, cfg_model.vae)
    del ae
    check_tree_vae(vae_tree, abstract["vae"])
    params["vae"] = streaming.place_numpy(vae_tree, abstract["vae"])
    bar.update(sum(int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize for s in jax.tree.leaves(abstract["vae"])))
    bar.close()
    seconds = time.time() - t0

    meta = {
        "format": META_FORMAT,
        "model": jsonable(cfg_model),
        "layout": {"scan_axis": 0, "scan_layers": bool(cfg_model.scan_layers), "stacked": sorted("/".join(e.path) for e in table if e.layers is not None),
                   "param_dtype": str(cfg_model.param_dtype)},
        "source": {
            "path": os.path.abspath(source), "kind": "bagel_folder", "vae_naming": fold.vae_naming,
            "ema_dtype": _single_dtype(fold.ema_header), "ae_dtype": _single_dtype(fold.ae_header),
            "llm_config": fold.llm_config, "vit_config": fold.vit_config, "extra_files": fold.extra_files,
        },
        "import": {"seconds": round(seconds, 3), "bytes_read_ema": ema_bytes, "bytes_read_ae": ae_bytes,
                   "process_count": jax.process_count(), "devices": jax.device_count()},
    }
    return params, cfg_model, meta


def _single_dtype(header: Mapping[str, TensorInfo]) -> str:
    dtypes = sorted({v.dtype for v in header.values()})
    return dtypes[0] if len(dtypes) == 1 else "mixed:" + ",".join(dtypes)


def check_tree_vae(vae_tree, abstract_vae) -> None:
    expected = {"/".join(p): tuple(v.shape) for p, v in flatten_paths(abstract_vae).items()}
    actual = {"/".join(p): tuple(np.shape(v)) for p, v in flatten_paths(vae_tree).items()}
    problems = check_keys(expected, actual, "converted VAE tree")
    if problems:
        raise ConversionError(problems, "converted VAE tree")


TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json",
                   "special_tokens_map.json", "added_tokens.json", "generation_config.json")


def copy_tokenizer_files(source: str, workdir: str) -> list[str]:
    """Copy the BAGEL folder's tokenizer files next to the imported params, so that an imported workdir
    used as ``config.checkpoint.init_from`` is also a tokenizer folder (``config.data.tokenizer=""``)."""
    copied = []
    for name in TOKENIZER_FILES:
        src = os.path.join(source, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(workdir, name))
            copied.append(name)
    return copied


def run_import(config, args) -> int:
    """``--mode import``: BAGEL folder (``--source``) -> ``<workdir>/params`` + params_meta.json."""
    if not args.source:
        raise ValueError("--mode import needs --source <BAGEL or OmniGen2 folder>")
    from sgt_jax.checkpoint import omnigen2_folder

    if omnigen2_folder.is_omnigen2_folder(args.source):  # the family is recognised from the layout
        return run_import_omnigen2(config, args)
    params, cfg_model, meta = import_folder(args.source, config)
    os.makedirs(args.workdir, exist_ok=True)
    t0 = time.time()
    path = store.save_params(args.workdir, params, meta)
    copied = copy_tokenizer_files(args.source, args.workdir) if jax.process_index() == 0 else []
    if copied:
        print(f"copied tokenizer files {copied} -> {args.workdir} (so --config.checkpoint.init_from="
              f"{args.workdir} also provides the tokenizer)")
    log.info("imported %s -> %s (read %.1f s, save %.1f s)", args.source, path, meta["import"]["seconds"],
             time.time() - t0)
    print(f"imported {args.source} -> {path}")
    return 0


def run_import_omnigen2(config, args) -> int:
    """``--mode import`` of an OmniGen2 folder: transformer/, vae/ and mllm/ -> ``<workdir>/params``
    (``{"dit", "vae", "mllm"}``: the DiT of ``transformer/`` under ``dit``, as in sgt_jax/models/omnigen2.py) + params_meta.json (sgt_jax/checkpoint/omnigen2_folder.py)."""
    from sgt_jax.checkpoint import omnigen2_folder, store

    params, _, _, meta = omnigen2_folder.import_folder(args.source, config)
    os.makedirs(args.workdir, exist_ok=True)
    path = store.save_params(args.workdir, params, meta)
    print(f"imported {args.source} (transformer/, vae/, mllm/) -> {path}")
    return 0


# ---- export ----------------------------------------------------------------------------------------


def export_folder(params: Mapping, cfg_model, dest: str, meta: Mapping | None = None, *,
                  progress: bool = True) -> str:
    """Write ``params`` (nested dict of jax or numpy arrays, VAE included) as a BAGEL folder at ``dest``:
    ema.safetensors (bf16 unless the source was another dtype), ae.safetensors (FLUX naming),
    llm_config.json, vit_config.json (num_layers + 1 listed) and the source's tokenizer files if the
    source folder is still there. Only process 0 writes; every process must call this."""
    import json

    from tqdm import tqdm

    meta = dict(meta or {})
    source = meta.get("source", {})
    table = bagel_table(cfg_model)
    check_tree(table, {k: v for k, v in params.items() if k != "vae"}, "parameters to export")
    writer_proc = jax.process_index() == 0
    if writer_proc:
        os.makedirs(dest, exist_ok=True)
    ema_code = source.get("ema_dtype", "BF16")
    if ema_code.startswith("mixed"):
        ema_code = "BF16"
    specs = streaming.table_specs(table, ema_code)
    tables = sincos_tables(cfg_model)
    for key, (grid, dim) in tables.items():
        specs[key] = TensorInfo(ema_code, (grid * grid, dim))
    total = sum(s.nbytes for s in specs.values())
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="export", disable=not progress or not writer_proc)
    writer = StreamingWriter(os.path.join(dest, folder_lib.EMA_FILE), specs, {"format": "pt"}) \
        if writer_proc else None
    try:
        streaming.write_table(table, params, writer, ema_code, progress=bar.update)
        if writer is not None:
            for key, (grid, dim) in tables.items():  # the formula, rounded like the official file
                value = sincos_value(grid, dim).astype(np.float32).astype(numpy_dtype(ema_code))
                writer.write(key, value)
                bar.update(value.nbytes)
    except BaseException:
        if writer is not None:
            writer.abort()
        raise
    if writer is not None:
        writer.close()
    bar.close()

    vae = jax.tree.map(lambda x: streaming.to_host(x), dict(params["vae"]))
    if writer_proc:
        ae_code = source.get("ae_dtype", "F32")
        ae_dtype = numpy_dtype("F32" if ae_code.startswith("mixed") else ae_code)
        ae = params_to_vae_state_dict(vae, cfg_model.vae)
        write_all(os.path.join(dest, folder_lib.AE_FILE),
                  sorted((k, np.asarray(v).astype(ae_dtype)) for k, v in ae.items()), {"format": "pt"})
        with open(os.path.join(dest, folder_lib.LLM_CONFIG), "w") as f:
            json.dump(folder_lib.llm_config_json(cfg_model, source.get("llm_config")), f, indent=2)
        with open(os.path.join(dest, folder_lib.VIT_CONFIG), "w") as f:
            json.dump(folder_lib.vit_config_json(cfg_model, source.get("vit_config")), f, indent=2)
        _copy_extra_files(source, dest)
    return dest


def _copy_extra_files(source: Mapping, dest: str) -> None:
    """Tokenizer and other non-weight files of the source folder, when it is still reachable."""
    src, extra = source.get("path"), source.get("extra_files") or []
    if not extra:
        return
    if not src or not os.path.isdir(src):
        log.warning("source folder %s is gone: not copying %s (copy the tokenizer files by hand)", src, extra)
        return
    for name in extra:
        p = os.path.join(src, name)
        if os.path.isfile(p) and not os.path.exists(os.path.join(dest, name)):
            shutil.copy2(p, os.path.join(dest, name))


def _training_steps(workdir: str) -> list[int]:
    d = store.checkpoint_dir(workdir)
    if not os.path.isdir(d):
        return []
    return sorted(int(n) for n in os.listdir(d) if n.isdigit())


def load_workdir_params(config, args):
    """(params, cfg_model, meta) of a workdir: its latest (or ``args.step``) training checkpoint when it has
    any (``args.weights`` ema|raw), else its imported ``params/``."""
    base = config if config is not None else default_config()
    mesh, rules = mesh_and_rules(base)
    steps = _training_steps(args.workdir)
    if not steps:
        if args.step is not None:
            raise FileNotFoundError(f"--step {args.step}: {args.workdir} has no training checkpoints")
        if not os.path.exists(os.path.join(args.workdir, store.PARAMS_META)):
            raise FileNotFoundError(
                f"{args.workdir}: nothing to load: no training checkpoints ({store.checkpoint_dir(args.workdir)}"
                f"/<step>/, written by --mode train) and no imported parameters ({store.PARAMS_META}, written by "
                "--mode import); export and the inference modes take either")
        meta = store.read_params_meta(args.workdir)
        cfg_model = model_config_from_meta(meta)
        return store.load_params(args.workdir, abstract_params(cfg_model, mesh=mesh, rules=rules)), cfg_model, meta

    step = steps[-1] if args.step is None else int(args.step)
    if step not in steps:
        raise FileNotFoundError(f"--step {step}: {args.workdir} has training checkpoints {steps}")
    run_config = store.read_json_item(args.workdir, step, "config")
    cfg_model = model_config_from_meta({"model": run_config["model"]})
    target = abstract_params(cfg_model, mesh=mesh, rules=rules)
    init_from = str(run_config.get("checkpoint", {}).get("init_from", "") or "")
    with_vae = store.read_json_item(args.workdir, step, "layout").get("with_vae", True)
    params = store.load_for_inference(args.workdir, step=step, weights=args.weights,
                                      abstract_params=target if with_vae else
                                      {k: v for k, v in target.items() if k != "vae"})
    if not with_vae:  # a cached-latent run keeps no VAE: take the (frozen) VAE from where the run started
        params["vae"] = _vae_from(init_from, cfg_model, target, args.workdir)
    meta: dict = {"source": {}}
    if init_from and os.path.exists(os.path.join(init_from, store.PARAMS_META)):
        meta = store.read_params_meta(init_from)  # JSON templates, dtypes, tokenizer files of the source
    elif init_from and os.path.exists(os.path.join(init_from, folder_lib.LLM_CONFIG)):
        fold = folder_lib.open_folder(init_from)
        meta = {"source": {"path": os.path.abspath(init_from), "llm_config": fold.llm_config,
                           "vit_config": fold.vit_config, "extra_files": fold.extra_files,
                           "ema_dtype": _single_dtype(fold.ema_header), "ae_dtype": _single_dtype(fold.ae_header)}}
    log.info("exporting step %d (%s weights) of %s", step, args.weights, args.workdir)
    return params, cfg_model, meta


def _vae_folders(init_from: str) -> tuple[list[str], bool]:
    """Where a run started from ``init_from`` can take its frozen VAE: candidate BAGEL folders (the
    folder itself, or an imported workdir's recorded source) and whether ``init_from`` is an imported
    workdir (whose params hold the VAE)."""
    folders = [init_from]
    imported = bool(init_from) and os.path.exists(os.path.join(init_from, store.PARAMS_META))
    if imported:
        folders.append(store.read_params_meta(init_from).get("source", {}).get("path", ""))
    return [f for f in folders if f], imported


def vae_available(init_from: str) -> bool:
    """Can an export of a run that keeps no VAE (cached latents) find one through ``init_from``?"""
    folders, imported = _vae_folders(init_from)
    return imported or any(os.path.isfile(os.path.join(f, folder_lib.AE_FILE)) for f in folders)


def _vae_from(init_from: str, cfg_model, target: Mapping, workdir: str):
    """The frozen VAE for a checkpoint that does not store it: from the BAGEL folder the run started from
    (directly, or through the imported workdir's recorded source), else from the imported params."""
    folders, imported = _vae_folders(init_from)
    for f in folders:
        ae_path = os.path.join(f, folder_lib.AE_FILE)
        if os.path.isfile(ae_path):
            with SliceReader(ae_path) as reader:
                ae = {k: reader.read(k) for k in sorted(reader.keys())}
            tree = vae_state_dict_to_params(ae, cfg_model.vae)
            check_tree_vae(tree, target["vae"])
            return streaming.place_numpy(tree, target["vae"])
    if imported:
        log.warning("loading all imported params of %s to take the VAE from them", init_from)
        return store.load_params(init_from, target)["vae"]
    raise FileNotFoundError(f"{workdir}: the training checkpoint holds no VAE and the run's "
                            f"checkpoint.init_from ({init_from!r}) leads to no ae.safetensors or imported params")


def run_export(config, args) -> int:
    """``--mode export``: ``<workdir>/params`` (or a training checkpoint) -> BAGEL folder ``--dest``."""
    if not args.dest:
        raise ValueError("--mode export needs --dest <folder to write>")
    steps = _training_steps(args.workdir)
    if not steps and os.path.isfile(os.path.join(args.workdir, "params_meta.json")):
        if store.read_params_meta(args.workdir).get("family") == "omnigen2":
            return run_export_omnigen2(config, args)
    if steps and _run_family(args.workdir, steps[-1] if args.step is None else int(args.step)) == "omnigen2":
        return run_export_omnigen2_checkpoint(config, args, steps)
    params, cfg_model, meta = load_workdir_params(config, args)
    export_folder(params, cfg_model, args.dest, meta)
    print(f"exported {args.workdir} -> {args.dest}")
    return 0


def _run_family(workdir: str, step: int) -> str:
    """The model family of a training checkpoint's run config ("bagel" for runs older than the field)."""
    try:
        model = store.read_json_item(workdir, step, "config")["model"]
    except (FileNotFoundError, KeyError):
        return "bagel"
    return str(model.get("family", "bagel"))


def run_export_omnigen2_checkpoint(config, args, steps: list[int]) -> int:
    """``--mode export`` of an OmniGen2 training checkpoint (``--weights`` ema|raw; raw when the run kept
    no EMA) -> an OmniGen2 folder. The folder layout (keys, dtypes, shard files, the MLLM's other files)
    comes from what the run started from (``checkpoint.init_from``): the imported workdir's
    params_meta.json, or the OmniGen2 folder's configs and headers, so that the export loads wherever the
    source folder did."""
    from sgt_jax.checkpoint import omnigen2_folder

    step = steps[-1] if args.step is None else int(args.step)
    if step not in steps:
        raise FileNotFoundError(f"--step {step}: {args.workdir} has training checkpoints {steps}")
    run_config = store.read_json_item(args.workdir, step, "config")
    init_from = str(run_config["checkpoint"]["init_from"] or "")
    if init_from and os.path.exists(os.path.join(init_from, store.PARAMS_META)):
        meta = store.read_params_meta(init_from)
    elif init_from and omnigen2_folder.is_omnigen2_folder(init_from):
        meta = omnigen2_folder.folder_meta(init_from, config)
    else:
        raise ValueError(f"{args.workdir}: an OmniGen2 training checkpoint exports in the layout of what its run "
                         f"started from (checkpoint.init_from: an OmniGen2 folder or a workdir written by "
                         f"--mode import); this run's init_from is {init_from!r} (gone, or a run from random "
                         f"weights, which has no released layout to write)")
    cfg_dit, cfg_vae, cfg_mllm = omnigen2_folder.configs_from_meta(meta)
    layout = store.read_json_item(args.workdir, step, "layout")
    weights = args.weights if layout.get("ema", True) else "raw"
    if weights != args.weights:
        log.info("the run kept no EMA: exporting its raw weights")
    mesh, rules = mesh_and_rules(config if config is not None and "mesh" in config else default_config())
    target = omnigen2_folder.abstract_params(cfg_dit, cfg_vae, cfg_mllm, mesh, rules)
    params = store.load_for_inference(args.workdir, step=step, weights=weights, abstract_params=target)
    omnigen2_folder.export_folder(params, cfg_dit, cfg_vae, args.dest, meta)
    print(f"exported step {step} ({weights} weights) of {args.workdir} -> {args.dest}")
    return 0


def run_export_omnigen2(config, args) -> int:
    """``--mode export`` of imported OmniGen2 params -> an OmniGen2 folder at ``--dest``."""
    from sgt_jax.checkpoint import omnigen2_folder, store

    meta = store.read_params_meta(args.workdir)
    cfg_dit, cfg_vae, cfg_mllm = omnigen2_folder.configs_from_meta(meta)
    mesh, rules = mesh_and_rules(config if config is not None and "mesh" in config else default_config())
    params = store.load_params(args.workdir, omnigen2_folder.abstract_params(cfg_dit, cfg_vae, cfg_mllm, mesh, rules))
    omnigen2_folder.export_folder(params, cfg_dit, cfg_vae, args.dest, meta)
    print(f"exported {args.workdir} -> {args.dest}")
    return 0
