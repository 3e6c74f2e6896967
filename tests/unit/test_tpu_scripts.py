"""tpu/ scripts: --help works and --dry-run prints exactly the gcloud commands (no cloud here)."""

import os
import shlex
import subprocess
import sys

import pytest

TPU = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tpu")
SCRIPTS = ("create", "install", "launch", "logs", "delete")


def run(script, *argv, ok=True):
    proc = subprocess.run([sys.executable, os.path.join(TPU, f"{script}.py"), *argv], capture_output=True,
                          text=True, timeout=60)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def dry(script, *argv):
    """The commands a dry run prints, parsed back into argument lists."""
    out = run(script, "--dry-run", *argv).stdout  # first: anything after "--" goes to sgt_jax.main
    return [shlex.split(line[len("[dry-run] "):]) for line in out.splitlines() if line.startswith("[dry-run] ")]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help(script):
    out = run(script, "--help").stdout
    assert "--dry-run" in out and "--zone" in out


def test_create_vm_and_queued():
    assert dry("create", "--name", "sgt", "--zone", "us-east5-a", "--type", "v5p-8") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "create", "sgt", "--zone=us-east5-a", "--accelerator-type=v5p-8",
         "--version=v2-alpha-tpuv5"]]
    cmds = dry("create", "--name", "sgt", "--zone", "us-east1-d", "--project", "p", "--type", "v6e-64",
               "--queued", "--spot")
    assert cmds[0] == ["gcloud", "compute", "tpus", "queued-resources", "create", "sgt", "--zone=us-east1-d",
                       "--project=p", "--accelerator-type=v6e-64", "--runtime-version=v2-alpha-tpuv6e",
                       "--node-id=sgt", "--spot"]
    assert cmds[1][:6] == ["gcloud", "compute", "tpus", "queued-resources", "describe", "sgt"]


def test_create_multislice_and_runtime_defaults():
    cmds = dry("create", "--name", "sgt", "--zone", "z", "--type", "v4-32", "--num-slices", "2")
    assert "--node-count=2" in cmds[0] and "--node-prefix=sgt" in cmds[0]
    assert "--runtime-version=tpu-ubuntu2204-base" in cmds[0]
    cmds = dry("create", "--name", "sgt", "--zone", "z", "--type", "v5litepod-64")
    assert "--version=v2-alpha-tpuv5-lite" in cmds[0]


def test_install_copies_head_to_every_node():
    cmds = dry("install", "--name", "sgt", "--zone", "z", "--num-slices", "2")
    assert cmds[0][:3] == ["git", "-C", os.path.dirname(TPU)] and cmds[0][-1] == "HEAD"
    scps = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]]
    sshs = [c for c in cmds if c[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh"]]
    assert [c[6] for c in scps] == ["sgt-0:~/sgt_jax.tar.gz", "sgt-1:~/sgt_jax.tar.gz"]
    assert [c[5] for c in sshs] == ["sgt-0", "sgt-1"] and all("--worker=all" in c for c in sshs)
    assert 'pip install -q -e "$HOME/sgt_jax[tpu]"' in sshs[0][-1]


def test_launch_multihost_multislice():
    cmds = dry("launch", "--name", "sgt", "--zone", "z", "--type", "v5p-16", "--num-slices", "2", "--run", "r1",
               "--workdir", "gs://b/r1", "--env", "A=1", "--", "--config.train.steps=100")
    assert [c[5] for c in cmds] == ["sgt-0", "sgt-1"]
    remote = cmds[0][-1]
    assert remote.startswith("--command=mkdir -p $HOME/sgt_logs && cd $HOME/sgt_jax && export A=1 && ")
    main = shlex.split(remote.split("nohup ", 1)[1].split(" > ", 1)[0])
    assert main == ["$HOME/sgt_venv/bin/python", "-m", "sgt_jax.main", "--config=configs/bagel_sgt.py:7b",
                    "--workdir=gs://b/r1", "--mode=train", "--config.mesh.distributed.auto=True",
                    "--config.mesh.shape=(2,-1,1)", "--config.train.steps=100"]
    assert remote.endswith("< /dev/null & echo $! > $HOME/sgt_logs/r1.pid")


def test_launch_single_host_has_no_distributed_flag():
    cmds = dry("launch", "--name", "sgt", "--zone", "z", "--type", "v5p-8", "--workdir", "/tmp/w")
    assert "distributed.auto" not in cmds[0][-1] and "mesh.shape" not in cmds[0][-1]
    stop = dry("launch", "--name", "sgt", "--zone", "z", "--type", "v5p-8", "--run", "r1", "--stop")
    assert "kill $(cat $HOME/sgt_logs/r1.pid)" in stop[0][-1]


def test_logs_and_delete():
    follow = dry("logs", "--name", "sgt", "--zone", "z", "--run", "r1", "--follow", "--worker", "1")
    assert follow == [["gcloud", "compute", "tpus", "tpu-vm", "ssh", "sgt", "--zone=z", "--worker=1",
                       "--command=tail -n 50 -F $HOME/sgt_logs/r1.log"]]
    collect = dry("logs", "--name", "sgt", "--zone", "z", "--run", "r1", "--collect", "out")
    assert collect[1] == ["mkdir", "-p", "out/sgt"] and collect[2][5:7] == ["sgt:~/sgt_logs/r1-*.log", "out/sgt/"]
    assert dry("delete", "--name", "sgt", "--zone", "z", "--yes") == [
        ["gcloud", "compute", "tpus", "tpu-vm", "delete", "sgt", "--zone=z", "--quiet"]]
    assert dry("delete", "--name", "sgt", "--zone", "z", "--num-slices", "3")[0][3:6] == [
        "queued-resources", "delete", "sgt"]


@pytest.mark.parametrize("script, argv, msg", [
    ("create", ["--type", "v3-8"], "expected v4-N"),
    ("create", ["--type", "v5p-8", "--num-slices", "0"], "num-slices"),
    ("launch", ["--type", "v5p-8"], "--workdir is required"),
    ("launch", ["--type", "v5p-8", "--workdir", "w", "--env", "NOEQUALS"], "KEY=VALUE"),
    ("delete", ["--name", "Bad_Name"], "lowercase"),
    ("launch", ["--type", "v5p-8", "--workdir", "w", "--", "--dry-run"], "before '--'"),
])
def test_bad_input_fails_with_a_clear_message(script, argv, msg):
    base = ["--zone", "z"] + ([] if "--name" in argv else ["--name", "sgt"])
    proc = run(script, "--dry-run", *base, *argv, ok=False)
    assert proc.returncode != 0 and msg in proc.stderr
