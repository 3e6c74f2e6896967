"""Settings users choose: evaluation presets, instruction list files, the official app's numeric choices,
config lookup by file name, --print_config and --helpfull, the EMA note of loaded weights."""

import json
import os

import jax.numpy as jnp
import numpy as np
import pytest

from sgt_jax import configs_util
from sgt_jax.configs_util import flat_fields, load_config
from sgt_jax.data import templates
from sgt_jax.eval import cli as eval_cli
from sgt_jax.eval import presets
from sgt_jax.sampling.inference import to_uint8
from sgt_jax.sampling.loading import ema_note


@pytest.fixture
def tiny():
    return load_config("configs/sgt_tiny.py")


def test_geneval_presets_set_the_official_settings(tiny):
    lines = presets.apply_preset(tiny, "geneval_official", "ema", "/x/evaluation_metadata_long.jsonl")
    assert tiny.evaluate.kind == "geneval" and tiny.evaluate.geneval_n_per_prompt == 1
    assert tuple(tiny.generate.t2i.cfg_interval) == (0.0, 1.0) and tiny.generate.timestep_shift == 3.0
    assert tiny.generate.num_timesteps == 50 and tiny.generate.seed == 42
    assert tiny.generate.uint8 == "truncate" and tiny.model.pos_table_dtype == "bfloat16"
    assert "0.88 -> SGT-BAGEL 0.90" in lines[0] and not any("note" in l for l in lines)
    assert any("generate.t2i.cfg_interval = (0.0, 1.0) (was (0.4, 1.0))" in l for l in lines)
    short = load_config("configs/sgt_tiny.py")
    lines = presets.apply_preset(short, "geneval_short", "ema", "prompts/evaluation_metadata_long.jsonl")
    assert "78.21 -> SGT 80.95" in lines[0] and "note" in lines[-1]  # the long file under the short preset
    with pytest.raises(ValueError, match="--weights=raw"):
        presets.apply_preset(load_config("configs/sgt_tiny.py"), "geneval_official", "raw", None)
    with pytest.raises(ValueError, match="allowed"):
        presets.apply_preset(load_config("configs/sgt_tiny.py"), "geneval", "ema", None)


def test_uint8_round_or_truncate():
    x = (np.array([0.2, 0.7, 1.3, 1.8, 254.6]) / 255.0 * 2.0 - 1.0).astype(np.float32)  # pixel values * 255
    np.testing.assert_array_equal(to_uint8(x, "truncate"), [0, 0, 1, 1, 254])
    np.testing.assert_array_equal(to_uint8(x, "round"), [0, 1, 1, 2, 255])
    np.testing.assert_array_equal(to_uint8(np.array([-3.0, 3.0]), "truncate"), [0, 255])
    with pytest.raises(ValueError, match="generate.uint8"):
        to_uint8(x, "floor")


def test_instruction_list_files(tiny, tmp_path):
    txt = tmp_path / "official.txt"
    txt.write_text("Segment instances with different colors.\n\n  Give each mask its own color.  \n")
    tiny.data.seg_instructions = str(txt)
    lists = templates.instruction_lists(tiny)
    assert lists["seg"] == ("Segment instances with different colors.", "Give each mask its own color.")
    assert lists["edge"] == templates.EDGE  # the other tasks keep the built-in templates
    js = tmp_path / "list.json"
    js.write_text(json.dumps(["Colour each instance.", "Paint every object."]))
    assert templates.load_instructions(str(js)) == ("Colour each instance.", "Paint every object.")
    for content, match in (("{not json", "not valid JSON"), (json.dumps({"a": 1}), "array of strings"),
                           ("[]", "no instruction")):
        js.write_text(content)
        with pytest.raises(ValueError, match=match):
            templates.load_instructions(str(js))
    with pytest.raises(FileNotFoundError, match="seg_instructions"):
        templates.load_instructions(str(tmp_path / "missing.txt"))


def test_inference_default_instruction_is_a_training_instruction(tiny):
    assert tiny.segment.instruction == ""  # "": the first instruction of the run's list
    assert templates.instruction_lists(tiny)["seg"][0] in templates.SEGMENTATION


def test_config_found_by_file_name_from_anywhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_config("bagel_sgt.py:7b").variant == "7b" and load_config("configs/sgt_tiny.py").variant == "tiny"
    shipped = tmp_path / "site" / "configs"  # an installed package's copy, when no checkout is around
    shipped.mkdir(parents=True)
    (shipped / "only_here.py").write_text("def get_config(v=''):\n    return {'v': v}\n")
    monkeypatch.setattr(configs_util, "CONFIG_DIRS", (str(tmp_path / "no_checkout"), str(shipped)))
    assert load_config("only_here.py:x") == {"v": "x"}
    with pytest.raises(FileNotFoundError, match="only_here.py"):  # the message lists the shipped configs
        load_config("nope.py")


def test_print_config_fields_and_help_lists_every_evaluate_kind(tiny):
    fields = dict(flat_fields(tiny))
    assert fields["train.ema_decay"] == 0.9 and fields["evaluate.preset"] == "" and "train.peak_flops" in fields
    from absl import flags

    import sgt_jax.main  # noqa: F401  (defines the flags)

    mode_help = flags.FLAGS["mode"].help
    for word in eval_cli.EVAL_KINDS + tuple(presets.PRESETS):
        assert word in mode_help, word
    assert "Required" in flags.FLAGS["workdir"].help and "print_config" in flags.FLAGS


def test_ema_note():
    assert "weigh 0.12" in ema_note({"train": {"ema_decay": 0.9}}, 20)
    assert "mostly the starting weights" in ema_note({"train": {"ema_decay": 0.9999}}, 20)
    assert "mostly" not in ema_note({"train": {"ema_decay": 0.9}}, 300)


def test_tiny_ema_moves_within_the_default_run(tiny):
    assert tiny.train.ema_decay ** tiny.train.steps < 0.2


def test_workdir_imported_before_a_new_model_field_still_loads(tiny):
    """params_meta.json written before model.pos_table_dtype existed: the field takes today's default."""
    from sgt_jax.checkpoint import convert

    meta = {"model": tiny.model.to_dict()}
    del meta["model"]["pos_table_dtype"]
    m = convert.model_config_from_meta(meta)
    assert m.pos_table_dtype == "float32" and m.llm.hidden_size == 64 and m.vae.ch_mult == (1, 2)
