"""Regenerates tpu/colab_quickstart.ipynb from the cells below (edit here, then run this script).

    python tpu/make_colab_notebook.py
"""
import os

import nbformat as nbf

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "colab_quickstart.ipynb")

md, code = nbf.v4.new_markdown_cell, nbf.v4.new_code_cell
cells = [
md("""# sgt_jax quickstart (Colab / TPU VM / CPU)

Semantic Generative Tuning (SGT) of BAGEL in JAX. This notebook:

1. installs `sgt_jax` (skipped when `SGT_NOTEBOOK_SKIP_INSTALL=1`, e.g. in CI or inside a checkout),
2. detects the accelerator (TPU, GPU or CPU),
3. imports a BAGEL-7B-MoT folder if one is mounted, otherwise builds the **tiny** BAGEL-shaped model
   (a few M parameters; trains on the built-in synthetic shapes world, no download),
4. answers a question about an image (`understand`), generates an image (`generate`) and segments images
   by generation (`segment`), with the images shown inline,
5. trains a few SGT steps of the tiny config (resuming from its checkpoint),
6. exports the result to a BAGEL PyTorch folder.

Every step calls the same mode functions as the command line
`python -m sgt_jax.main --mode MODE --config ... --workdir ...` (see the README).

**Memory:** the 7B path needs ~30 GB of accelerator memory for inference in bf16 (a TPU VM such as v5p-8,
v4-8 or v6e-4 running Jupyter). Colab's free TPU (v5e-1, 16 GB) and CPUs run the tiny path. Untrained tiny
weights give meaningless text and images: the point is to see every mode run end to end."""),
code("""# Settings (environment variables override them, which is how tests/integration/test_notebook.py runs it)
import glob, os, sys, time

SKIP_INSTALL = os.environ.get("SGT_NOTEBOOK_SKIP_INSTALL") == "1"
REPO_URL = os.environ.get("SGT_REPO_URL", "")  # your sgt_jax repository (git URL); "" if the code is already here
REPO_DIR = os.environ.get("SGT_REPO_DIR", "sgt_jax")
BAGEL_DIR = os.environ.get("SGT_BAGEL_DIR", "/content/drive/MyDrive/BAGEL-7B-MoT")  # mount Drive first for 7B
WORKDIR = os.path.abspath(os.environ.get("SGT_NOTEBOOK_WORKDIR", "/content/runs" if os.path.isdir("/content") else "runs/notebook"))
BUILD_STEPS = 2  # tiny model: steps of the first training run that builds and saves it
TRAIN_STEPS = int(os.environ.get("SGT_NOTEBOOK_TRAIN_STEPS", "4"))  # total tiny steps after "train a few steps"
os.makedirs(WORKDIR, exist_ok=True)
print("workdir:", WORKDIR)"""),
code("""# Install sgt_jax (with libtpu on TPU hosts)
import subprocess

def on_tpu_host() -> bool:
    return any(os.path.exists(p) for p in ("/dev/accel0", "/dev/vfio/0")) or "TPU_ACCELERATOR_TYPE" in os.environ \\
        or "COLAB_TPU_ADDR" in os.environ

if SKIP_INSTALL:
    print("SGT_NOTEBOOK_SKIP_INSTALL=1: using the sgt_jax already importable from", os.getcwd())
else:
    if not os.path.exists(os.path.join(REPO_DIR, "setup.py")):
        if not REPO_URL:
            raise SystemExit("Set REPO_URL (or $SGT_REPO_URL) to your sgt_jax git repository, or upload the "
                             "repository to ./sgt_jax, then re-run this cell.")
        subprocess.check_call(["git", "clone", "--depth=1", REPO_URL, REPO_DIR])
    extra = "[tpu]" if on_tpu_host() else ""
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", os.path.abspath(REPO_DIR) + extra])
    sys.path.insert(0, os.path.abspath(REPO_DIR))  # the running kernel does not re-read site-packages
    os.chdir(REPO_DIR)  # config paths (configs/...) are relative to the repository"""),
code("""# Which accelerator? (JAX falls back to CPU silently if another process holds the TPU: we print it.)
import jax

PLATFORM = jax.default_backend()
print(f"JAX {jax.__version__}: platform={PLATFORM}, {jax.device_count()} device(s), kind={jax.devices()[0].device_kind}")
if on_tpu_host() and PLATFORM != "tpu":
    print("WARNING: this host has TPUs but JAX runs on", PLATFORM, "- another process may hold libtpu")"""),
code("""# Helpers: load a config with overrides, run a mode in-process, show the images a mode wrote
import importlib
from IPython.display import Image, display
from sgt_jax.configs_util import load_config
from sgt_jax.main import MODES
from sgt_jax.mode_args import ModeArgs

def config_with(spec, **overrides):
    \"\"\"load_config(spec) then set dotted fields, e.g. config_with("configs/sgt_tiny.py", **{"train.steps": 4}).\"\"\"
    cfg = load_config(spec)
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for name in parents:
            node = node[name]
        node[leaf] = value
    return cfg

def run_mode(mode, cfg, **flags):
    \"\"\"Same as: python -m sgt_jax.main --mode MODE --config ... --FLAG=VALUE ...; returns its start time.\"\"\"
    t0 = time.time()
    module, fn = MODES[mode]
    getattr(importlib.import_module(module), fn)(cfg, ModeArgs(**flags))
    print(f"[--mode {mode}: {time.time() - t0:.1f} s]")
    return t0

def show_new_images(folder, since, limit=6, width=192):
    files = sorted(f for f in glob.glob(os.path.join(folder, "**", "*.png"), recursive=True)
                   if os.path.getmtime(f) >= since)
    for f in files[:limit]:
        print(os.path.relpath(f, folder))
        display(Image(filename=f, width=width))
    if not files:
        print("no new images under", folder)
    return files"""),
code("""# The model: import BAGEL-7B-MoT if its folder is mounted, else build the tiny model (a short training run)
HAVE_BAGEL = os.path.exists(os.path.join(BAGEL_DIR, "ema.safetensors"))
TINY_DIR = os.path.join(WORKDIR, "tiny")
if HAVE_BAGEL:
    MODEL_CFG = config_with("configs/bagel_sgt.py:7b", **{"train.platform": "any"})
    MODEL_DIR = os.path.join(WORKDIR, "bagel7b")
    run_mode("import", MODEL_CFG, workdir=MODEL_DIR, source=BAGEL_DIR)
else:
    print("no BAGEL folder at", BAGEL_DIR, "-> the tiny model")
    MODEL_CFG = config_with("configs/sgt_tiny.py", **{"train.steps": BUILD_STEPS})
    MODEL_DIR = TINY_DIR
    run_mode("train", MODEL_CFG, workdir=MODEL_DIR)"""),
code("""# An input image: a few coloured shapes drawn with PIL
from PIL import Image as PILImage, ImageDraw

IMAGE = os.path.join(WORKDIR, "shapes.png")
img = PILImage.new("RGB", (224, 224), "white")
draw = ImageDraw.Draw(img)
draw.ellipse((20, 30, 110, 120), fill=(220, 30, 30))
draw.rectangle((120, 110, 200, 200), fill=(30, 60, 220))
draw.polygon([(40, 200), (90, 140), (110, 210)], fill=(40, 170, 60))
img.save(IMAGE)
display(Image(filename=IMAGE, width=192))"""),
code("""# understand: image + question -> answer (also saved to <workdir>/understand/answers.jsonl)
import json

run_mode("understand", MODEL_CFG, workdir=MODEL_DIR, prompt="What shapes are in this image?", images=(IMAGE,))
with open(os.path.join(MODEL_DIR, "understand", "answers.jsonl")) as f:
    answer = json.loads(f.readlines()[-1])
print("Q:", answer.get("prompt"))
print("A:", answer.get("answer", answer))"""),
code("""# generate: text -> image
t0 = run_mode("generate", MODEL_CFG, workdir=MODEL_DIR, prompt="A red circle next to a blue square.")
show_new_images(MODEL_DIR, t0)"""),
code("""# segment: segmentation *by generation* on the built-in synthetic scenes, scored with mIoU
t0 = run_mode("segment", MODEL_CFG, workdir=MODEL_DIR)
show_new_images(MODEL_DIR, t0)"""),
code("""# train a few SGT steps of the tiny config (resumes from its checkpoint if the tiny model was built above)
TRAIN_CFG = config_with("configs/sgt_tiny.py", **{"train.steps": TRAIN_STEPS})
run_mode("train", TRAIN_CFG, workdir=TINY_DIR)
print(sorted(os.listdir(os.path.join(TINY_DIR, "checkpoints"))))"""),
code("""# export: the trained tiny run -> a BAGEL PyTorch folder (ema.safetensors, ae.safetensors, configs)
EXPORT_DIR = os.path.join(WORKDIR, "export_tiny")
run_mode("export", TRAIN_CFG, workdir=TINY_DIR, dest=EXPORT_DIR)
for name in sorted(os.listdir(EXPORT_DIR)):
    print(f"{name:32s} {os.path.getsize(os.path.join(EXPORT_DIR, name)):>12,d} bytes")"""),
md("""Next: `tpu/README.md` walks through a BAGEL-7B-MoT SGT run on a TPU pod (compile-mode sizing, data
preparation, import, launch on all workers, resume, export)."""),
]
nb = nbf.v4.new_notebook(cells=cells, metadata={
    "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"},
    "language_info": {"name": "python"},
    "accelerator": "TPU", "colab": {"provenance": []}})
nbf.write(nb, OUT)
print("wrote", OUT)
