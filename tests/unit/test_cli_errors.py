"""Input errors: one line naming the file or field and what is wrong, exit status 1, no traceback (the rows
of docs/errors.md). The one-line/exit-status wrapper is tested through the real command line on the
cheap rows (they fail before any mode is imported); every message is tested in-process."""

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

from sgt_jax import errors
from sgt_jax.data import sources
from sgt_jax.data.records import BadSample
from sgt_jax.mode_args import ModeArgs

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _cli(*args, env=None):
    e = {k: v for k, v in os.environ.items() if k != "SGT_DEBUG"}
    e.update(JAX_PLATFORMS="cpu", **(env or {}))
    return subprocess.run([sys.executable, "-m", "sgt_jax.main", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env=e)


def _one_line_error(res, *parts):
    assert res.returncode == errors.EXIT_USER_ERROR, res.stderr[-2000:]
    assert "Traceback" not in res.stderr, res.stderr[-2000:]
    lines = [ln for ln in res.stderr.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1, res.stderr[-2000:]
    for p in parts:
        assert p in lines[0], lines[0]


@pytest.mark.parametrize("args,parts", [
    (["--config.data.nope=1", "--workdir", "w"], ["--config.data.nope", "no field 'nope'"]),
    ([], ["--workdir is required"]),
])
def test_cli_command_line_mistakes(args, parts):
    _one_line_error(_cli("--config", "configs/sgt_tiny.py", *args), *parts)


def test_cli_workdir_that_is_a_file_is_left_alone(tmp_path):
    f = tmp_path / "run"
    f.write_text("my notes")
    _one_line_error(_cli("--config", "configs/sgt_tiny.py", "--workdir", str(f)), str(f), "is a file, not a folder")
    assert f.read_text() == "my notes"
    res = _cli("--config", "configs/sgt_tiny.py", "--workdir", str(f), env={"SGT_DEBUG": "1"})
    assert res.returncode == 1 and "Traceback" in res.stderr and "InputError" in res.stderr


def test_cli_wrong_type_is_absl_one_line():
    res = _cli("--config", "configs/sgt_tiny.py", "--config.train.steps=abc", "--workdir", "w")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert "flag --config.train.steps=abc: invalid literal for int()" in res.stderr


def test_run_cli_one_line_and_debug(capsys, monkeypatch):
    monkeypatch.delenv("SGT_DEBUG", raising=False)

    def boom():
        raise FileNotFoundError("sa1b: no *.jpg under '/nope' (config.data.sources.seg.root)")

    with pytest.raises(SystemExit) as e:
        errors.run_cli(boom, argv=["prog"])
    assert e.value.code == 1
    assert capsys.readouterr().err == "error: sa1b: no *.jpg under '/nope' (config.data.sources.seg.root)\n"
    monkeypatch.setenv("SGT_DEBUG", "1")
    with pytest.raises(FileNotFoundError):
        errors.run_cli(boom, argv=["prog"])

    def bug():
        raise RuntimeError("a bug in sgt_jax")

    monkeypatch.delenv("SGT_DEBUG")
    with pytest.raises(RuntimeError):  # not an input error: the traceback stays
        errors.run_cli(bug, argv=["prog"])

    def library_bug():
        np.reshape(np.zeros(3), (2, 2))  # a ValueError raised inside numpy: a bug of ours, not an input

    with pytest.raises(ValueError, match="cannot reshape"):
        errors.run_cli(library_bug, argv=["prog"])


def test_message_lists_problems_on_one_line():
    err = ValueError("BAGEL folder /x does not match the model (7 problem(s)):\n  " +
                     "\n  ".join(f"missing file: f{i}" for i in range(7)))
    msg = errors.message(err)
    assert "\n" not in msg and "missing file: f0; missing file: f1" in msg and "and 2 more" in msg
    assert errors.message(FileNotFoundError(2, "No such file or directory", "/a/b")) == "/a/b: No such file or directory"


# ---- the data inputs (messages in-process; prepare through the wrapper once) --------------------------------


def test_non_utf8_list_file(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"sam_selection/a.jpg\n\xff\xfe\x00bad\n")
    with pytest.raises(ValueError, match=r"list.txt: not UTF-8 text \(byte b'\\xff' at offset 20\)"):
        sources.SamSgtFolderSource(str(tmp_path), "list.txt")


def test_prepare_cli_non_utf8_list_file_one_line(tmp_path):
    (tmp_path / "list.txt").write_bytes(b"\xff\xfe")
    out = tmp_path / "prep"
    out.mkdir()
    (out / "keep.txt").write_text("earlier output")
    res = _cli("--mode", "prepare", "--config", "configs/sgt_tiny.py", "--config.data.sources.seg.kind=sam_sgt",
               "--config.data.sources.seg.list_file=list.txt", "--config.data.latents=online",
               "--source", str(tmp_path), "--workdir", str(out))
    _one_line_error(res, str(tmp_path / "list.txt"), "not UTF-8")
    assert sorted(os.listdir(out)) == ["keep.txt"] and (out / "keep.txt").read_text() == "earlier output"


def test_garbage_tar(tmp_path):
    (tmp_path / "a.tar").write_bytes(b"this is not a tar file" * 40)
    with pytest.raises(ValueError, match=r"a.tar: not a readable uncompressed tar file"):
        sources.SamSgtTarSource(str(tmp_path))
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        info = tarfile.TarInfo("x.jpg")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    (tmp_path / "a.tar").write_bytes(buf.getvalue())  # a gzipped tar named .tar
    with pytest.raises(ValueError, match="not a readable uncompressed tar file"):
        sources.SamSgtTarSource(str(tmp_path))


def test_non_json_coco_file(tmp_path):
    (tmp_path / "train2017").mkdir()
    (tmp_path / "panoptic_train2017").mkdir()
    (tmp_path / "pan.json").write_text('{"annotations": [')
    with pytest.raises(ValueError, match=r"pan.json: not valid JSON \(Expecting value at line 1 column 18\)"):
        sources.CocoPanopticSource(str(tmp_path), "pan.json", "", "")
    (tmp_path / "pan.json").write_text('{"images": 3}')
    with pytest.raises(ValueError, match="pan.json: not a COCO panoptic annotation file"):
        sources.CocoPanopticSource(str(tmp_path), "pan.json", "", "")


def test_garbage_jsonl_line_is_not_called_utf16(tmp_path):
    good = {"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}]}
    (tmp_path / "v.jsonl").write_bytes(json.dumps(good).encode() + b"\n\x00\x91garbage\x00\n{not json\n")
    v = sources.LlavaVqaSource(str(tmp_path / "v.jsonl"))
    assert v.decode(v[0])["turns"][1]["value"] == "a"
    with pytest.raises(BadSample) as e:
        v.decode(v[1])
    assert e.value.reason == "bad_record" and "v.jsonl:1: not UTF-8" in e.value.detail
    assert "utf-16" not in str(e.value).lower()
    with pytest.raises(BadSample, match=r"v.jsonl:2: invalid JSON: Expecting property name"):
        v.decode(v[2])


def test_missing_source_path():
    with pytest.raises(FileNotFoundError, match=r"sa1b: no \*.jpg under '/nonexistent/raw'"):
        sources.Sa1bSource("/nonexistent/raw")


# ---- checkpoints, folders, images ------------------------------------------------------------------------


def test_half_deleted_checkpoint_is_named(tmp_path):
    import jax

    from sgt_jax.checkpoint import store

    manager = store.make_manager(str(tmp_path), keep=3, async_save=False)
    for step in (1, 2):
        store.save(manager, step, {"params": {"w": np.full((3,), step, np.float32)}}, data_state={}, config={},
                   layout={"with_vae": True})
    store.wait(manager)
    manager.close()
    for d in (tmp_path / "checkpoints" / "2" / "params").rglob("d"):  # the array data files
        shutil.rmtree(d)
    sds = jax.ShapeDtypeStruct((3,), np.float32, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[0]))
    manager = store.make_manager(str(tmp_path), keep=3, read_only=True)
    with pytest.raises(store.DamagedCheckpointError) as e:
        store.restore_latest_valid(manager, {"params": {"w": sds}}, step=2)
    manager.close()
    msg = errors.message(e.value)
    assert "\n" not in msg and "checkpoint step 2 in" in msg and "pass --step with an older one ([1])" in msg
    assert (tmp_path / "checkpoints" / "2").is_dir()  # an explicit --step moves nothing
    for d in (tmp_path / "checkpoints" / "1" / "params").rglob("d"):  # now no step restores
        shutil.rmtree(d)
    manager = store.make_manager(str(tmp_path), keep=3)
    with pytest.raises(ValueError, match=r"none of the checkpoints \[1, 2\] .* nothing was moved"):
        store.restore_latest_valid(manager, {"params": {"w": sds}})
    manager.close()
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]  # maybe the config changed: keep all
    (tmp_path / "checkpoints" / "1" / "layout" / "metadata").unlink()
    with pytest.raises(store.DamagedCheckpointError, match="checkpoint step 1 in"):
        store.read_json_item(str(tmp_path), 1, "layout")


def test_import_of_empty_and_truncated_folders(tmp_path):
    from safetensors.numpy import save_file

    from sgt_jax.checkpoint import folder, safetensors_io

    with pytest.raises(folder.FolderError) as e:
        folder.open_folder(str(tmp_path))
    msg = errors.message(e.value)
    assert str(tmp_path) in msg and "missing file: llm_config.json; missing file: vit_config.json" in msg
    path = str(tmp_path / "ema.safetensors")
    save_file({"a": np.zeros((64, 64), np.float32)}, path)
    with open(path, "r+b") as f:
        f.truncate(os.path.getsize(path) - 100)
    with pytest.raises(ValueError, match=r"ema.safetensors: truncated: the header places tensor data up to byte"):
        safetensors_io.read_header(path)


def test_export_of_a_workdir_without_weights_names_both_kinds(tmp_path):
    from sgt_jax.checkpoint import convert

    with pytest.raises(FileNotFoundError) as e:
        convert.load_workdir_params(None, ModeArgs(workdir=str(tmp_path)))
    msg = str(e.value)
    assert "no training checkpoints" in msg and "no imported parameters" in msg and "take either" in msg


def test_input_images_are_checked_before_weights_load(tmp_path, tiny_config):
    from sgt_jax.sampling import cli

    (tmp_path / "notes.png").write_text("not an image")
    args = ModeArgs(workdir=str(tmp_path), prompt="what is it", images=(str(tmp_path / "gone.png"),))
    with pytest.raises(FileNotFoundError, match="gone.png' does not exist"):
        cli.understand_mode(tiny_config, args)  # the workdir has no weights: the image is named first
    args = ModeArgs(workdir=str(tmp_path), prompt="what is it", images=(str(tmp_path / "notes.png"),))
    with pytest.raises(ValueError, match=r"notes.png: not an image \(UnidentifiedImageError\)"):
        cli.generate_mode(tiny_config, args)
    with pytest.raises(ValueError, match=r"notes.png: not a readable image \(corrupt_image\)"):
        cli.load_image(str(tmp_path / "notes.png"))
    req = tmp_path / "req.jsonl"
    req.write_text('{"prompt": "q", "image": "gone.png"}\n')
    with pytest.raises(FileNotFoundError, match="gone.png"):
        cli.read_requests(ModeArgs(workdir=str(tmp_path), input=str(req)))
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "ok.png")
    req.write_text('{"prompt": "q", "image": "ok.png"}\n{oops\n')
    with pytest.raises(ValueError, match=r"req.jsonl line 2: not JSON"):
        cli.read_requests(ModeArgs(workdir=str(tmp_path), input=str(req)))


def test_geneval_metadata_line_not_json(tmp_path):
    from sgt_jax.eval import geneval

    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text('{"prompt": "a cat"}\n\n{"prompt": oops}\n')
    with pytest.raises(ValueError, match=r"evaluation_metadata.jsonl line 3: not JSON"):
        geneval.read_metadata(str(meta))
