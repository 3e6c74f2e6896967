"""Import benchmark: BAGEL-shaped folders at FULL width, 2 and 8 layers; time, MB/s and peak host memory.

    .venv/bin/python bench/import_bench.py [--layers 2 8] [--root /tmp] [--keep]

For each layer count N a folder with the 7B widths (hidden 3584, vocab 152064, MLP 18944, ViT 1152 /
4304, FLUX VAE) and N LLM layers (both experts) and N ViT layers is written under ``--root`` (bf16,
tensor by tensor), then imported in a FRESH subprocess so its peak RSS is its own, then deleted.

What the child measures. On a CPU host the JAX "device" memory *is* host memory, so keeping every
imported parameter would make RSS grow with the model by construction (that memory sits in HBM on a
TPU). The child therefore runs the real streaming path (``open_folder`` -> ``infer_model_config`` ->
``check_folder`` -> abstract sharded model -> ``streaming.fill_entry`` per parameter, VAE included) and
drops each finished parameter, which isolates the host-side cost of reading + converting + placing:
  * wall time and MB/s of bf16 bytes read from ema.safetensors (+ ae.safetensors),
  * peak RSS (``resource.getrusage``: includes the one device-resident parameter being built),
  * peak numpy memory (``tracemalloc``: the host slices/blocks alive at once),
  * the largest single parameter (fp32), which bounds the device-side part of the RSS.
Memory independent of size = peak RSS and tracemalloc peak about equal for N = 2 and N = 8, while
the bytes read grow ~2.3x. Results are appended to bench/results/import.md.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
import tracemalloc

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _model(layers: int):
    from sgt_jax.configs_util import load_config

    config = load_config("configs/bagel_sgt.py:7b")
    config.model.llm.num_layers = layers
    config.model.vit.num_layers = layers
    return config


class _ProcSampler:
    """Samples /proc/self/status every 20 ms: peak RssAnon (private memory: numpy buffers and, on CPU,
    the device arrays) and peak RssFile (pages of the memory-mapped safetensors file: clean page cache,
    reclaimable, counted in RSS while mapped)."""

    def __init__(self):
        import threading

        self.peak = {"RssAnon": 0, "RssFile": 0}
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.is_set():
            with open("/proc/self/status") as f:
                for line in f:
                    k = line.split(":")[0]
                    if k in self.peak:
                        self.peak[k] = max(self.peak[k], int(line.split()[1]))  # KiB
            self._stop.wait(0.02)

    def stop(self) -> dict:
        self._stop.set()
        self._t.join()
        return {k: round(v / 1024) for k, v in self.peak.items()}


def child(folder: str) -> dict:
    """Import ``folder`` parameter by parameter, dropping each; return the measurements."""
    import jax
    import numpy as np

    from sgt_jax.checkpoint import convert, folder as folder_lib, streaming
    from sgt_jax.checkpoint.safetensors_io import SliceReader
    from sgt_jax.checkpoint.table import get_path
    from sgt_jax.models.bagel import abstract_params
    from sgt_jax.parallel.mesh import logical_rules, make_mesh

    config = _model(2)  # only the non-architecture fields are used; the architecture is inferred
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t0 = time.time()
    fold = folder_lib.open_folder(folder)
    m = folder_lib.infer_model_config(fold, config.model)
    convert.check_folder(fold, m)
    abstract = abstract_params(m, mesh=make_mesh(config.mesh), rules=logical_rules(config))
    t_setup = time.time() - t0
    tracemalloc.start()  # after the model tracing (tracemalloc slows Python down a lot)
    sampler = _ProcSampler()
    largest = 0
    with SliceReader(fold.ema_path) as reader:
        for e in convert.bagel_table(m):
            target = get_path(abstract, e.path)
            arr = streaming.fill_entry(e, reader, target)
            arr.block_until_ready()
            largest = max(largest, arr.nbytes)
            del arr
        ema_read = reader.bytes_read
    with SliceReader(fold.ae_path) as reader:
        ae = {k: reader.read(k) for k in sorted(reader.keys())}
        ae_read = reader.bytes_read
    vae = streaming.place_numpy(convert.vae_state_dict_to_params(ae, m.vae), abstract["vae"])
    jax.block_until_ready(vae)
    del ae, vae
    seconds = time.time() - t0
    _, np_peak = tracemalloc.get_traced_memory()
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    proc_peaks = sampler.stop()
    n_params = sum(int(np.prod(s.shape)) for s in jax.tree.leaves(abstract))
    return {"llm_layers": m.llm.num_layers, "vit_layers": m.vit.num_layers, "params": n_params,
            "seconds": round(seconds, 2), "setup_seconds": round(t_setup, 2),
            "bytes_read": ema_read + ae_read, "mb_per_s": round((ema_read + ae_read) / 2**20 / seconds, 1),
            "peak_rss_mib": round(peak_rss / 1024), "rss_before_import_mib": round(base_rss / 1024),
            "peak_rss_anon_mib": proc_peaks["RssAnon"], "peak_rss_file_mib": proc_peaks["RssFile"],
            "numpy_peak_mib": round(np_peak / 2**20), "largest_param_mib": round(largest / 2**20),
            "devices": jax.device_count(), "backend": jax.default_backend()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, nargs="+", default=[2, 8])
    ap.add_argument("--root", default="/tmp")
    ap.add_argument("--keep", action="store_true", help="keep the folders")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "import.md"))
    a = ap.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child)))
        return

    from tests.fixtures.bagel_folder import write_bagel_folder

    rows = []
    for n in a.layers:
        folder = os.path.join(a.root, f"sgt_import_bench_{n}")
        shutil.rmtree(folder, ignore_errors=True)
        try:
            t0 = time.time()
            write_bagel_folder(folder, _model(n).model, seed=n)
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
            print(f"wrote {folder}: {size / 2**30:.2f} GiB in {time.time() - t0:.0f} s", flush=True)
            proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", folder],
                                  capture_output=True, text=True, cwd=ROOT)
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode or not line:
                raise RuntimeError(f"child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
            r = json.loads(line[0][7:])
            r["folder_gib"] = round(size / 2**30, 2)
            rows.append(r)
            print(json.dumps(r), flush=True)
        finally:
            if not a.keep:
                shutil.rmtree(folder, ignore_errors=True)

    cmd = "python bench/import_bench.py " + " ".join(sys.argv[1:])
    lines = [f"\n## Run of {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n", f"Command: `{cmd.strip()}`\n",
             "| LLM+ViT layers | params | folder GiB | read GiB | import s | MB/s | peak RSS MiB | "
             "peak RssAnon MiB | peak RssFile MiB | RSS before MiB | numpy peak MiB | largest param MiB | devices |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['llm_layers']}+{r['vit_layers']} | {r['params'] / 1e9:.2f} B | {r['folder_gib']} | "
                     f"{r['bytes_read'] / 2**30:.2f} | {r['seconds']} | {r['mb_per_s']} | {r['peak_rss_mib']} | "
                     f"{r.get('peak_rss_anon_mib', '-')} | {r.get('peak_rss_file_mib', '-')} | "
                     f"{r['rss_before_import_mib']} | {r['numpy_peak_mib']} | {r['largest_param_mib']} | "
                     f"{r['devices']} {r['backend']} |")
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "a") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
