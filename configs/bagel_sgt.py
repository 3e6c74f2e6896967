"""BAGEL-7B-MoT SGT configs.

Variants (``--config configs/bagel_sgt.py:VARIANT``):
  7b    BAGEL-7B-MoT with the paper's SGT hyper-parameters (BAGEL-7B-MoT's `llm_config.json` / `vit_config.json`, song2yu/SGT `BAGEL/shells/train_sgt.sh`).
  tiny  a few-M-parameter model of the same shape family, for CPU runs and tests.
  small ~8.0 M parameters of the same family, sized to LEARN the synthetic world on a CPU (the SGT ablation of
        bench/toy_sgt.py); otherwise the tiny variant's settings (synthetic data, fp32, dense attention).

Each top-level section belongs to one part of the code base:
  model -> sgt_jax/models, data -> sgt_jax/data, train/optim -> sgt_jax/train, mesh -> sgt_jax/parallel,
  checkpoint -> sgt_jax/checkpoint, compile -> sgt_jax/compile.py, generate/understand/segment/evaluate ->
  sgt_jax/sampling and sgt_jax/eval.
"""

import ml_collections

VARIANTS = ("7b", "tiny", "small")


def _model_7b():
    m = ml_collections.ConfigDict()
    m.family = "bagel"  # configs/omnigen2_sgt.py: "omnigen2"
    m.llm = ml_collections.ConfigDict(
        dict(
            hidden_size=3584,
            num_layers=28,
            num_heads=28,
            num_kv_heads=4,
            head_dim=128,
            intermediate_size=18944,
            vocab_size=152064,
            rope_theta=1_000_000.0,
            rms_norm_eps=1e-6,
        )
    )
    m.vit = ml_collections.ConfigDict(
        dict(
            hidden_size=1152,
            intermediate_size=4304,
            num_heads=16,
            num_layers=26,  # vit_config.json lists 27; BAGEL instantiates 26 (ByteDance-Seed/Bagel `modeling/bagel/siglip_navit.py`)
            patch_size=14,
            max_patches_per_side=70,
            layer_norm_eps=1e-6,
        )
    )
    m.vae = ml_collections.ConfigDict(
        dict(
            in_channels=3,
            out_channels=3,
            ch=128,
            ch_mult=(1, 2, 4, 4),
            num_res_blocks=2,
            z_channels=16,
            num_groups=32,
            scale_factor=0.3611,
            shift_factor=0.1159,
        )
    )
    m.latent_patch_size = 2
    m.max_latent_size = 64
    m.timestep_freq_dim = 256
    # Special token ids (Qwen2.5 vocabulary; checked against the tokenizer by sgt_jax/data).
    m.tokens = ml_collections.ConfigDict(dict(bos=151644, eos=151645, vision_start=151652, vision_end=151653))
    m.dtype = "bfloat16"  # compute dtype
    m.param_dtype = "float32"  # master weights
    m.scan_layers = True
    m.remat_policy = "full"  # sgt_jax/models/remat.py POLICIES; --config.compile.search_remat picks one
    # "auto": the Pallas kernel on TPU, "chunked" elsewhere; "pallas", "chunked" (XLA, memory-lean),
    # "dense" (tests, small packs): docs/model.md, docs/attention_kernel.md
    m.attention_impl = "auto"
    m.attention_chunk = 1024  # query/key block of "chunked" attention (H200, 16k tokens: docs/model.md)
    # Sin-cos position tables: "float32" (the official trainer's values) or "bfloat16" (the copies in a BAGEL
    # folder, which the official inference code uses; on in the official evaluation presets)
    m.pos_table_dtype = "float32"
    m.attention_block_q = 512  # query / key block of the Pallas kernel (TPU: multiples of 8 / 128)
    m.attention_block_kv = 512
    m.freeze_und = False  # True: stop gradients at the und expert (reference freeze_und, ByteDance-Seed/Bagel `modeling/bagel/qwen2_navit.py`)
    return m


def _model_tiny():
    m = _model_7b()
    m.llm.update(
        dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16, intermediate_size=128,
             vocab_size=512, rope_theta=10_000.0)
    )
    m.vit.update(dict(hidden_size=32, intermediate_size=64, num_heads=2, num_layers=2))
    m.vae.update(dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, z_channels=4, num_groups=8))
    m.max_latent_size = 32
    # The tiny synthetic tokenizer puts its special tokens at fixed ids (sgt_jax/data/tokenizer.py).
    m.tokens = ml_collections.ConfigDict(dict(bos=1, eos=2, vision_start=3, vision_end=4))
    m.dtype = "float32"
    m.remat_policy = "none"
    m.attention_impl = "dense"
    m.attention_chunk = 128
    return m


def _model_small():
    m = _model_tiny()
    m.llm.update(dict(hidden_size=256, num_layers=4, num_heads=4, num_kv_heads=2, head_dim=64,
                      intermediate_size=768))
    m.vit.update(dict(hidden_size=128, intermediate_size=256, num_heads=2, num_layers=2))
    # VAE stride 8 (downsample 4 x latent patch 2): a 64x64 scene is 8x8 latent tokens of 2*2*8 values.
    # ch 16: the study's VAE trains at ~1.5 CPU-s per batch of 16 (ch 32: 4.5 s) and reaches 23 dB PSNR on
    # held-out scenes in 300 steps (bench/results/toy_sgt.md).
    m.vae.update(dict(ch=16, ch_mult=(1, 2, 2), z_channels=8))
    return m


def _small_overrides(c):
    """The small variant: the tiny variant's settings with the model, world and budgets of bench/toy_sgt.py."""
    c.model = _model_small()
    # Square 64x64 scenes (8x8 latent tokens per generated image), with relative-size questions.
    c.data.sources.synthetic.update(dict(sizes=((64, 64),), num_samples=4096, size_questions=True))
    c.data.transforms.update(dict(vae=(64, 32, 8)))
    c.data.packs_per_batch = 1
    # One pack holds 4 generated images (4 x 64 gen tokens) with 2 VQA samples, or 1 VQA + 4 SGT samples
    # (bench/toy_sgt.py; the most und tokens measured over 150 such steps: 236).
    c.data.pack = ml_collections.ConfigDict(dict(und_tokens=288, gen_tokens=256, vit_patches=96, ce_labels=96,
                                                 vae_images=4))
    c.generate.update(dict(height=64, width=64, num_timesteps=12))
    c.analysis.update(dict(attn_gen_size=(64, 64)))
    c.mesh.max_replicated_fraction = 0.25


def _data_sources(variant):
    """Raw data sources (owner: sgt_jax/data/sources). ``kind`` picks the reader; unused fields are ignored.

    seg.kind: synthetic | sam_sgt (list file + sam_selection/ + sam_mask/) | sam_sgt_tar (tar shards) |
              sa1b (jpg + json with RLEs) | coco_panoptic | prepared (ArrayRecord shards from --mode prepare) |
              tfds (an sgt_shapes-like TFDS dataset in array_record format)
    vqa.kind: synthetic | llava (JSON array or JSONL) | prepared | tfds | none
    Paths are absolute, or relative to ``root``.
    """
    s = ml_collections.ConfigDict()
    s.seg = ml_collections.ConfigDict(dict(
        kind="synthetic" if variant == "tiny" else "sam_sgt",
        root="" if variant == "tiny" else "data/SAM-SGT",
        list_file="" if variant == "tiny" else "file_names/sam_190k_new.txt",  # sam_sgt
        annotations="",  # coco_panoptic: panoptic_*.json
        image_dir="",  # coco_panoptic: train2017/
        mask_dir="",  # coco_panoptic: panoptic_train2017/
        max_samples=0 if variant == "tiny" else 190_000,  # 0 = all; else a seeded random subset
        tfds_name="sgt_shapes/default", split="train",  # tfds (root = TFDS data_dir)
    ))
    s.vqa = ml_collections.ConfigDict(dict(
        kind="synthetic" if variant == "tiny" else "llava",
        root="" if variant == "tiny" else "data/LLaVA-OneVision-SGT/llava_onevision_balanced_500k",
        annotations="" if variant == "tiny" else "annotations/all_data.json",
        image_root="" if variant == "tiny" else "images",
        max_samples=0,
        tfds_name="sgt_shapes/default", split="train",  # tfds (root = TFDS data_dir)
    ))
    # The built-in shapes world (sgt_jax/data/synthetic.py): deterministic from (seed, index).
    s.synthetic = ml_collections.ConfigDict(dict(
        seed=0, num_samples=512, sizes=((64, 64), (64, 96), (96, 64)), min_shapes=1, max_shapes=4,
        qa_per_sample=3,
    ))
    s.records_per_shard = 2048  # --mode prepare: ArrayRecord records per shard
    s.prepare_workers = 0 if variant == "tiny" else 8  # --mode prepare: decode threads (0 = in-process)
    return s


def _data_pipeline(c, variant):
    """Transforms, plans, packing and mixing (owner: sgt_jax/data pipeline; docs/data_pipeline.md)."""
    tiny = variant == "tiny"
    d = c.data
    # "synthetic": the tiny word-level tokenizer built locally; else a folder with tokenizer.json or
    # vocab.json + merges.txt ("" = config.checkpoint.init_from, a BAGEL checkpoint folder).
    d.tokenizer = "synthetic" if tiny else ""
    d.packs_per_batch = 2 if tiny else 8  # GLOBAL packs per step (each process makes packs_per_batch // processes)
    # Static budgets per pack: U und tokens (text, markers, ViT), Z gen (latent) tokens, P ViT patches,
    # L CE labels, NI VAE image slots. 7b: 18k tokens per pack per chip, >= 90 % filled by the 2:1 mix, so a
    # pack holds about the ~16.4k+ real tokens of an official pack (bench/results/packing.md).
    d.pack = ml_collections.ConfigDict(
        dict(und_tokens=256, gen_tokens=256, vit_patches=128, ce_labels=64, vae_images=4) if tiny else
        dict(und_tokens=6656, gen_tokens=11776, vit_patches=6144, ce_labels=4096, vae_images=8)
    )
    # Explicit seg:VQA quota per global batch. mode "samples": every batch holds exactly seg:vqa samples in
    # that ratio (whole groups of seg+vqa samples); "tokens": the ratio of their tokens, greedily tracked.
    d.quota = ml_collections.ConfigDict(dict(mode="samples", seg=2, vqa=1))
    # Candidate samples per group that the packer chooses from (best fit, sgt_jax/data/mixing.py); part of the
    # checkpointed iterator state. 1 = arrival order.
    d.pack_buffer = 4 if tiny else 64
    d.text_cond_dropout = 0.1  # SGT plan: the instruction split is dropped with this p (no RoPE advance)
    # ImageTransform (max, min, stride); vlm_max_pixels is shared by the images of one VQA sample.
    d.transforms = ml_collections.ConfigDict(
        dict(sgt_vit=(56, 56, 14), vae=(32, 16, 4), vlm_vit=(56, 28, 14), vlm_max_pixels=56 * 56) if tiny else
        dict(sgt_vit=(224, 224, 14), vae=(1024, 512, 16), vlm_vit=(980, 378, 14), vlm_max_pixels=2_007_040)
    )
    d.workers = 0 if tiny else 8  # Grain worker processes for decode+transform+plan (0 = in-process)
    d.worker_buffer = 2  # elements prefetched per worker
    # "online": batches carry vae_images (+ latent_rc), the frozen VAE encodes them in the step;
    # "cached": batches carry latent_mean/latent_logvar read from d.latent_cache (built by --mode prepare).
    d.latents = "online" if tiny else "cached"
    d.latent_cache = ""  # folder of the latent-statistics ArrayRecord shards (cached mode)
    # Resuming on another number of processes (e.g. a pod of another size): False = a clear error (exact
    # resume needs the same count); True = continue after the furthest position any old process read
    # (sgt_jax/data/pipeline.py reshard_states; the not-yet-read samples below it are skipped, and logged).
    d.reshard_on_resume = False


def get_config(variant: str = "7b") -> ml_collections.ConfigDict:
    if variant not in VARIANTS:
        raise ValueError(f"unknown bagel_sgt variant {variant!r}; choose one of {VARIANTS}")
    c = ml_collections.ConfigDict()
    c.variant = variant
    base = "tiny" if variant == "small" else variant  # small = tiny settings + _small_overrides at the end
    c.model = _model_7b() if base == "7b" else _model_tiny()

    # ---- data (sgt_jax/data) ----
    c.data = ml_collections.ConfigDict()
    c.data.seed = 42
    # -- data.sources / data.proxy_task (sgt_jax/data/sources, docs/data_sources.md) --
    # proxy task of the segmentation-family samples: segmentation | reconstruction | edge | inpainting
    c.data.proxy_task = "segmentation"
    # Segmentation instructions, for training and inference alike: "" = the built-in templates
    # (sgt_jax/data/templates.py), or a file: a JSON array of strings or text with one instruction per line.
    c.data.seg_instructions = ""
    # A mask (or RLE) of another size than its image: "skip" (default: a mismatch means a wrong pairing, a
    # crop or a rotation that a resize would hide) | "resize_nearest" (masks stored at another resolution;
    # the reference resizes bicubically, we never blend colours). docs/data_sources.md §2.
    c.data.mask_size_mismatch = "skip"
    c.data.sources = _data_sources(base)
    _data_pipeline(c, base)  # -- data pipeline keys (sgt_jax/data pipeline, docs/data_pipeline.md) --
    # ---- --mode prepare at pod scale (sgt_jax/data/prepare_shards.py) ----
    # "": one process, or every process of a jax.distributed job its own slice; "i/n": shard i of n on
    # separate machines (the last to finish merges); "merge": only merge the parts in --workdir.
    c.prepare = ml_collections.ConfigDict(dict(shard=""))

    # ---- train / optim (sgt_jax/train) ----
    c.train = ml_collections.ConfigDict()
    c.train.steps = 8000 if base == "7b" else 20
    c.train.seed = 4396
    c.train.ce_weight = 1.5
    c.train.mse_weight = 1.0
    c.train.timestep_shift = 1.0
    c.train.platform = "tpu" if base == "7b" else "any"  # startup check: "", any, cpu, gpu, tpu
    c.train.ce_chunk = 2048 if base == "7b" else 16  # CE labels per LM-head chunk (never [L, V] at once)
    # EMA of the trainable weights (what inference loads by default). 7b: 0.9999 (the paper's recipe);
    # tiny: 0.9, so that its 20-step run already moves the EMA (0.9999 ** 20 would keep 99.8 % of the init).
    c.train.ema_decay = 0.9999 if base == "7b" else 0.9
    c.train.ema_dtype = "float32"  # or "bfloat16" (halves EMA memory)
    c.train.ema_offload = False  # keep the EMA in pinned_host memory (error if the backend has none)
    # keep Adam's moments (mu, nu) in pinned_host memory; like the offloaded EMA they are updated leaf by
    # leaf and layer by layer, one slice on the device at a time (sgt_jax/train/offload.py)
    c.train.opt_offload = False
    c.train.max_consecutive_nonfinite = 5  # NaN/Inf loss or grad: update skipped; abort after this many in a row
    # Gradient accumulation: each step's packs_per_batch packs run as K micro-batches of packs_per_batch / K
    # (activation memory of one micro-batch), one update per step (sgt_jax/train/step.py).
    c.train.microbatches = 1
    # Host/device overlap (sgt_jax/train/loop.py): batches packed and put on the devices this many steps
    # ahead on a background thread (0: in the main thread, before each step), a step's metrics read one
    # step later, and the cross-process stop check every stop_check_every steps.
    c.train.prefetch = 2
    c.train.overlap = True
    c.train.stop_check_every = 10
    # (first, last) step of a jax.profiler trace written to <workdir>/profile; () = no trace.
    c.train.profile_steps = ()
    c.train.tensorboard = True
    # Per-device peak FLOP/s for the MFU column (0: the TPU chip's bf16 peak from its device kind; none on CPU).
    c.train.peak_flops = 0.0
    # Freezing (SGT default: everything trains except the VAE, which is always frozen).
    c.train.freeze = ml_collections.ConfigDict(
        dict(vit=False, connector=False, und=False, gen=False, embeddings=False, lm_head=False))
    c.optim = ml_collections.ConfigDict(
        dict(lr=1e-4, warmup_steps=1000 if base == "7b" else 2, schedule="constant", min_lr=1e-7,
             b1=0.9, b2=0.95, eps=1e-15, weight_decay=0.0, clip_norm=1.0,
             mu_dtype="float32")  # "bfloat16": Adam's first moment in bf16 (sgt_jax/train/optim.py)
    )

    # ---- mesh (sgt_jax/parallel) ----
    c.mesh = ml_collections.ConfigDict()
    c.mesh.axes = ("data", "fsdp", "tensor")
    c.mesh.shape = (1, -1, 1)  # -1: fill with the remaining devices
    # Ordered logical-name -> mesh-axes table (docs/interfaces.md §3). A name may repeat: the first entry
    # whose mesh axes are unused in that array and divide the dimension wins (sgt_jax/parallel/mesh.py).
    c.mesh.rules = (
        ("batch", ("data", "fsdp")),
        ("seq", None),
        ("layers", None),
        ("embed", "fsdp"),
        ("vocab", "tensor"),
        ("vocab", "fsdp"),
        ("q_heads", "tensor"),
        ("kv_heads", "tensor"),
        ("head_dim", None),
        ("mlp", "tensor"),
        ("mlp", "fsdp"),
        ("norm", None),
        ("vit_embed", "fsdp"),
        ("vit_heads", "tensor"),
        ("vit_head_dim", None),
        ("vit_mlp", "tensor"),
        ("vit_mlp", "fsdp"),
        ("vit_patch", None),
        ("vit_pos", None),
        ("conv_h", None),
        ("conv_w", None),
        ("conv_in", None),
        ("conv_out", "fsdp"),
        ("latent", None),
        ("act_embed", None),
        ("act_heads", "tensor"),
        ("act_mlp", "tensor"),
        ("act_vocab", "tensor"),
    )
    c.mesh.max_replicated_fraction = 0.02 if base == "7b" else 0.25  # startup check (tiny: norms weigh more)
    # Multi-process launch (also read from $SGT_COORDINATOR_ADDRESS/$SGT_NUM_PROCESSES/$SGT_PROCESS_ID);
    # auto=True lets jax.distributed detect the cluster (TPU pods). Empty: single process.
    c.mesh.distributed = ml_collections.ConfigDict(
        dict(coordinator_address="", num_processes=0, process_id=-1, auto=False))

    # ---- checkpoint (sgt_jax/checkpoint) ----
    c.checkpoint = ml_collections.ConfigDict()
    c.checkpoint.every = 1000 if base == "7b" else 10
    c.checkpoint.keep = 3
    c.checkpoint.init_from = ""  # "" (random init), an imported workdir, or a BAGEL PyTorch folder
    c.checkpoint.async_save = True
    c.checkpoint.export_at_end = ""  # "", "ema" or "raw": write a BAGEL PyTorch folder after the last step
    c.checkpoint.export_dir = ""  # default <workdir>/export

    # ---- compile (sgt_jax/compile.py) ----
    c.compile = ml_collections.ConfigDict()
    c.compile.topology = ""  # v4-N / v5p-N (N TensorCores), v5litepod-N / v6e-N (N chips), e.g. v5p-16
    c.compile.num_slices = 1  # > 1: multislice (data parallel over slices)
    c.compile.packs_per_chip = 1  # global packs per step = this x chips (0: keep data.packs_per_batch)
    # Share of attention block pairs that are live (not fully masked) in real packs; the chunked attention
    # skips the rest, and compile mode reports executed FLOPs with it (0: report only the upper bound,
    # every block computed). 7b: 0.3, above every batch measured by bench/attention_live_blocks.py at
    # chunk 1024 (0.20-0.28; bench/results/attention_blocks.md).
    # The Pallas kernel (model.attention_impl "pallas"/"auto" on TPU) skips dead pairs of its own blocks;
    # the same 0.3 bounds them (0.16-0.19 per batch at block 512). Its ViT use (image id as document)
    # skips other images' blocks: vit_live_fraction, 0.55 above every batch measured at block 512
    # (0.46 mean, 0.52 max).
    c.compile.attention_live_fraction = 0.3 if base == "7b" else 0.0
    c.compile.vit_live_fraction = 0.55 if base == "7b" else 0.0
    # Remat search: compile the policies of remat_candidates (() = sgt_jax/models/remat.py SEARCH_ORDER, the
    # least recompute first) and report the first that leaves hbm_headroom of the HBM free.
    # candidate_timeout_s > 0: each candidate compiles in a child process killed after that long (a timed-out
    # candidate is recorded and the search goes on); rows go to <workdir>/remat_search_<topology>.jsonl.
    c.compile.search_remat = False
    c.compile.remat_candidates = ()
    c.compile.hbm_headroom = 0.1
    c.compile.candidate_timeout_s = 0

    # ---- generate / understand / segment / evaluate / analysis (sgt_jax/sampling, sgt_jax/eval) ----
    _inference(c, base)

    if variant == "small":
        _small_overrides(c)
    return c


def _inference(c, variant):
    """generate / understand / segment / evaluate / analysis (owner: sgt_jax/sampling, sgt_jax/eval;
    docs/inference.md). Defaults follow BAGEL's inference notebook/app (ByteDance-Seed/Bagel `inference.ipynb` and `app.py`)."""
    tiny = variant == "tiny"
    cd = ml_collections.ConfigDict
    # KV-cache capacities are rounded up to this multiple: a bounded set of compiled shapes.
    cache_bucket = 64 if tiny else 512
    c.generate = cd(dict(
        num_timesteps=4 if tiny else 50,  # N grid points -> N-1 Euler steps
        timestep_shift=3.0,
        seed=42,
        height=32 if tiny else 1024,  # text-to-image output size (editing: the resized input's size)
        width=32 if tiny else 1024,
        num_images=1,  # images per request (seeds seed, seed+1, ...)
        # float -> uint8 of the output image: "round" (nearest) or "truncate" (the official inference code)
        uint8="round",
        t2i=cd(dict(cfg_text_scale=4.0, cfg_img_scale=1.0, cfg_interval=(0.4, 1.0), cfg_renorm_type="global",
                    cfg_renorm_min=0.0)),
        edit=cd(dict(cfg_text_scale=4.0, cfg_img_scale=2.0, cfg_interval=(0.0, 1.0),
                     cfg_renorm_type="text_channel", cfg_renorm_min=0.0)),
        # image inputs: "vae_vit" = BAGEL editing (clean VAE latents then ViT tokens), "vit" = ViT only (the
        # SGT segmentation training plan, song2yu/SGT `BAGEL/data/sam_190k.py`)
        image_condition="vae_vit",
        vae_sample=True,  # condition latents: posterior sample (BAGEL) or the mean (False)
        think=False,  # generate reasoning text first and append it to the gen context only (§3.5)
        max_think_tokens=16 if tiny else 1000,
        cache_bucket=cache_bucket,
    ))
    c.understand = cd(dict(
        max_new_tokens=16 if tiny else 512,
        do_sample=False,  # greedy; True: temperature + top-p sampling
        temperature=0.3,
        top_p=1.0,
        seed=42,
        # ViT resize for questions (max, min, stride): BAGEL app.py uses (980, 224, 14)
        vit_transform=(56, 28, 14) if tiny else (980, 224, 14),
        think=False,
        cache_bucket=cache_bucket,
    ))
    c.segment = cd(dict(
        # synthetic: held-out shapes-world scenes; data: the records of config.data.sources.seg (root
        # overridable with --input), ground truth = the rendered target's colours
        source="synthetic",
        # "" = the first segmentation instruction of the run's list (a training instruction:
        # config.data.seg_instructions, else the built-in templates, sgt_jax/data/templates.py)
        instruction="",
        start_index=100_000,  # synthetic: first scene index (training uses 0..num_samples-1)
        num_images=2 if tiny else 200,
        image_condition="vit",  # as SGT trains: ViT view of the image + instruction (see generate)
        vit_transform=(56, 56, 14) if tiny else (224, 224, 14),
        iou_threshold=0.5,
        save_overlays=True,
        cluster=cd(dict(bin_size=16, merge_dist=60.0, assign_dist=90.0, min_area=0.002,
                        background_color=(0, 0, 0), split_components=False, reject_blends=True)),
    ))
    c.evaluate = cd(dict(
        # a named protocol that sets the fields below and others (sgt_jax/eval/presets.py, docs/inference.md):
        # "" | "geneval_official" (long prompts, the paper's 0.88 -> 0.90) | "geneval_short" (78.21 -> 80.95)
        preset="",
        kind="mcq",  # mcq | geneval | probe | attention
        limit=0,  # 0 = all items
        mcq_suffix="Answer with the option's letter from the given choices directly.",
        mcq_max_new_tokens=8 if tiny else 16,
        geneval_n_per_prompt=4,  # GenEval's own protocol; the official BAGEL script (the presets) uses 1
    ))
    c.analysis = cd(dict(
        # linear probe (sgt_jax/eval/probe.py): features = "vit" and "llm<layer>" for each layer below
        probe_llm_layers=(1,) if tiny else (14, 20, 27),
        probe_num_images=24 if tiny else 400,  # synthetic probe set size
        probe_test_fraction=0.3,
        probe_c=1.0,
        probe_projection="pca",  # pca | tsne
        # attention allocation (sgt_jax/eval/attention_analysis.py)
        attn_num_prompts=2 if tiny else 100,
        attn_gen_step_fractions=(0.0, 0.5),  # denoising steps (fraction of N-1) where word attention is read
        # word-attention image size (H, W): the dense probabilities cost layers*heads*Z*(S+Z) floats, so 7b
        # reads them at 512² (1024 latent tokens, ~3.5 GB) rather than 1024²
        attn_gen_size=(32, 32) if tiny else (512, 512),
        lexicon="",  # JSON file {"object": [...], "color": [...], "position": [...]}; "" = built-in lexicon
    ))
