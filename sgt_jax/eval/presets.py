"""Named evaluation protocols: ``--config.evaluate.preset=NAME`` sets every field of a published protocol.

GenEval (the official BAGEL script, ByteDance-Seed/Bagel ``scripts/eval/run_geneval.sh`` ->
``eval/gen/gen_images_mp.py``, which SGT's repository song2yu/SGT keeps under ``BAGEL/``): 1 image per prompt
at 1024², CFG text scale 4 over the whole interval [0, 1], renorm min 0, timestep shift 3, 50 steps, seed 42,
EMA weights. Both presets also reproduce the official inference code's two numeric choices: the output
image truncated to uint8 (``generate.uint8``) and the bf16 sin-cos tables of the checkpoint folder
(``model.pos_table_dtype``). The image size is the config's (``generate.height/width``: 1024 for ``7b``).

  geneval_official  the rewritten long prompts (``evaluation_metadata_long.jsonl`` of the Bagel repository's
                    GenEval folder): compares to the paper's comparison table, BAGEL 0.88 -> SGT-BAGEL 0.90.
  geneval_short     the original GenEval prompts (``evaluation_metadata.jsonl``), otherwise the same: compares
                    to the paper's proxy-task ablation, BAGEL 78.21 -> SGT 80.95. The paper does not state this
                    table's protocol: we assume only the prompt file differs.

Our defaults without a preset differ from both: 4 images per prompt (GenEval's own protocol), the t2i CFG
interval (0.4, 1.0) of BAGEL's inference notebook, rounding to uint8 and fp32 sin-cos tables.
The scores themselves come from GenEval's detector script, run on the folder ``evaluate`` writes.
"""

from __future__ import annotations

_GENEVAL = {
    "evaluate.kind": "geneval",
    "evaluate.geneval_n_per_prompt": 1,
    "generate.t2i.cfg_text_scale": 4.0,
    "generate.t2i.cfg_interval": (0.0, 1.0),
    "generate.t2i.cfg_renorm_min": 0.0,
    "generate.timestep_shift": 3.0,
    "generate.num_timesteps": 50,
    "generate.seed": 42,
    "generate.uint8": "truncate",
    "model.pos_table_dtype": "bfloat16",
}

# name -> (the prompt file it expects, what its score compares to, the fields it sets)
PRESETS = {
    "geneval_official": ("evaluation_metadata_long.jsonl", "BAGEL 0.88 -> SGT-BAGEL 0.90 (comparison table)",
                         _GENEVAL),
    "geneval_short": ("evaluation_metadata.jsonl", "BAGEL 78.21 -> SGT 80.95 (proxy-task ablation)", _GENEVAL),
}


def apply_preset(config, name: str, weights: str, input_path: str | None) -> list[str]:
    """Set the preset's fields on ``config`` (in place) and return the lines that say what it set.

    A preset needs the EMA weights (``--weights ema``). A prompt file with another name than the preset's is
    not an error (it may have been renamed), but the returned lines say so."""
    if name not in PRESETS:
        raise ValueError(f"config.evaluate.preset={name!r}; allowed: '' or one of {tuple(PRESETS)}")
    if weights != "ema":
        raise ValueError(f"config.evaluate.preset={name!r} uses the EMA weights, but --weights={weights}")
    expected_file, compare_to, fields = PRESETS[name]
    lines = [f"preset {name}: compares to {compare_to}"]
    for dotted, value in fields.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        old = node[leaf]
        node[leaf] = value
        lines.append(f"  {dotted} = {value!r}" + (f" (was {old!r})" if old != value else ""))
    if input_path and not input_path.endswith(expected_file):
        lines.append(f"  note: --input {input_path!r} is not {expected_file}, the prompt file this preset expects")
    return lines
