"""The full packed BAGEL forward (ViT, connector, time embedder, MoT LLM, heads) vs a PyTorch reference
written here from BAGEL's official code (ByteDance-Seed/Bagel ``modeling/bagel/``): tokens in ORIGINAL order,
boolean-index expert routing, a dense additive mask built by the attention rule (docs/interfaces.md), SigLIP run image by image. Weights: one random BAGEL-keyed
state dict, loaded into JAX through ``sgt_jax.checkpoint.convert.bagel_state_dict_to_params``.

The JAX side gets the pack physically reordered (und tokens shuffled into [0, U), gen tokens shuffled
into [U, T), pads in both regions), as docs/interfaces.md §1 allows. fp32; tolerance atol 1e-5, rtol 1e-5
on CE logits (the lm_head of the CE hidden states) and on velocities.
"""

import math

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint.convert import bagel_state_dict_to_params, expected_ema_shapes  # noqa: E402
from sgt_jax.configs_util import load_config  # noqa: E402
from sgt_jax.models.bagel import Bagel  # noqa: E402

ATOL, RTOL = 1e-5, 1e-5  # observed max abs error ~2e-6 on values of size ~3
TEXT, VIT, LAT = 1, 2, 3
CAUSAL, FULL, NOISE = 0, 1, 2


# ------------------------------------------------------------------ random BAGEL state dict
def random_state_dict(cfg, seed=0):
    rng = np.random.default_rng(seed)
    sd = {}
    for key, shape in sorted(expected_ema_shapes(cfg).items()):
        if key.endswith("pos_embed"):
            continue  # fixed sin-cos tables: recomputed on both sides
        if "norm" in key and key.endswith("weight"):
            v = 1.0 + 0.2 * rng.standard_normal(shape)
        elif "embedding" in key or "embed_tokens" in key:
            v = 0.5 * rng.standard_normal(shape)
        else:
            fan_in = shape[-1] if len(shape) == 2 else 64
            v = rng.standard_normal(shape) / math.sqrt(fan_in) * (1.0 if len(shape) == 2 else 0.5)
        sd[key] = v.astype(np.float32)
    return sd


# ------------------------------------------------------------------ the pack, in original order
def build_pack(cfg, rng):
    """Three docs. 0: SGT (ViT image | instruction | noisy mask latents). 1: VQA (ViT image | question |
    answer with CE). 2: clean VAE condition (t=0, gen expert) | noisy latents | text (sees the clean
    block, not the noisy one)."""
    toks = []  # dicts with doc, split, mode, kind, rope, plus per-kind payload
    split = [0]
    vit_images, lat_images = [], []
    dl = cfg.latent_patch_size ** 2 * cfg.vae.z_channels
    ps = cfg.vit.patch_size

    def add(doc, mode, kinds, ropes, **kw):
        for i, (k, r) in enumerate(zip(kinds, ropes)):
            toks.append(dict(doc=doc, split=split[0], mode=mode, kind=k, rope=r, **{n: v[i] for n, v in kw.items()}))
        split[0] += 1

    def text(doc, rope, n, ce):
        ids = rng.integers(5, cfg.llm.vocab_size, n)
        add(doc, CAUSAL, [TEXT] * n, range(rope, rope + n), token=ids, ce=[ce] * n, vit=[None] * n, lat=[None] * n)
        return rope + n

    def vit_image(doc, rope, h, w):
        img = len(vit_images)
        vit_images.append(dict(patches=rng.uniform(-1, 1, (h * w, 3 * ps * ps)),
                               pos=np.array([r * cfg.vit.max_patches_per_side + c for r in range(h) for c in range(w)])))
        n = h * w + 2
        add(doc, FULL, [TEXT] + [VIT] * (h * w) + [TEXT], [rope] * n, token=[3] + [0] * (h * w) + [4],
            ce=[False] * n, vit=[None] + [(img, j) for j in range(h * w)] + [None], lat=[None] * n)
        return rope + 1

    def vae_image(doc, rope, h, w, noisy):
        img = len(lat_images)
        t = float(1 / (1 + np.exp(-rng.standard_normal()))) if noisy else 0.0
        lat_images.append(dict(x=rng.standard_normal((h * w, dl)), t=t,
                               pos=np.array([r * cfg.max_latent_size + c for r in range(h) for c in range(w)])))
        n = h * w + 2
        add(doc, NOISE if noisy else FULL, [TEXT] + [LAT] * (h * w) + [TEXT], [rope] * n,
            token=[3] + [0] * (h * w) + [4], ce=[False] * n, vit=[None] * n,
            lat=[None] + [(img, j) for j in range(h * w)] + [None])
        return rope if noisy else rope + 1

    r = vit_image(0, 0, 2, 3)
    r = text(0, r, 5, False)
    vae_image(0, r, 2, 2, noisy=True)
    r = vit_image(1, 0, 2, 2)
    r = text(1, r, 4, False)
    text(1, r, 4, True)
    r = vae_image(2, 0, 2, 3, noisy=False)
    r = vae_image(2, r, 1, 2, noisy=True)  # later text must not see this block (the noise rule)
    text(2, r, 3, True)
    return toks, vit_images, lat_images


# ------------------------------------------------------------------ PyTorch reference (original order)
def t_(a):
    return torch.as_tensor(np.asarray(a), dtype=torch.float32)


def sincos_torch(pos, grid, dim):
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def axis(x):
        a = x.double()[:, None] * omega[None]
        return torch.cat([torch.sin(a), torch.cos(a)], 1)

    pos = torch.as_tensor(pos)
    return torch.cat([axis(pos % grid), axis(pos // grid)], 1).float()


def torch_reference(cfg, sd, toks, vit_images, lat_images):
    W = {k: t_(v) for k, v in sd.items()}
    lin = lambda x, k, bias=True: x @ W[k + ".weight"].T + (W[k + ".bias"] if bias else 0)  # noqa: E731
    gelu = lambda x: torch.nn.functional.gelu(x, approximate="tanh")  # noqa: E731
    c, v = cfg.llm, cfg.vit
    H = c.hidden_size

    # SigLIP NaViT, one image at a time (== block-diagonal attention over the packed stream)
    vit_out = []
    pre = "vit_model.vision_model."
    for im in vit_images:
        x = lin(t_(im["patches"]), pre + "embeddings.patch_embedding") + W[pre + "embeddings.position_embedding.weight"][im["pos"]]
        nh = v.num_heads
        hd = v.hidden_size // nh
        for j in range(v.num_layers):
            L = pre + f"encoder.layers.{j}."
            ln = lambda y, n: torch.nn.functional.layer_norm(y, (v.hidden_size,), W[L + n + ".weight"], W[L + n + ".bias"], v.layer_norm_eps)  # noqa: E731,E501
            y = ln(x, "layer_norm1")
            q, k, vv = (lin(y, L + f"self_attn.{n}_proj").view(-1, nh, hd).transpose(0, 1) for n in "qkv")
            a = torch.softmax(q @ k.transpose(1, 2) / math.sqrt(hd), -1) @ vv
            x = x + lin(a.transpose(0, 1).reshape(-1, v.hidden_size), L + "self_attn.out_proj")
            x = x + lin(gelu(lin(ln(x, "layer_norm2"), L + "mlp.fc1")), L + "mlp.fc2")
        x = torch.nn.functional.layer_norm(x, (v.hidden_size,), W[pre + "post_layernorm.weight"], W[pre + "post_layernorm.bias"], v.layer_norm_eps)  # noqa: E501
        x = lin(gelu(lin(x, "connector.fc1")), "connector.fc2") + sincos_torch(im["pos"], v.max_patches_per_side, H)
        vit_out.append(x)

    def time_embed(t):
        freqs = torch.exp(-math.log(10000) * torch.arange(128, dtype=torch.float32) / 128)
        args = t[:, None] * freqs[None]
        f = torch.cat([torch.cos(args), torch.sin(args)], -1)
        return lin(torch.nn.functional.silu(lin(f, "time_embedder.mlp.0")), "time_embedder.mlp.2")

    lat_out = []
    for im in lat_images:
        t = torch.full((len(im["pos"]),), im["t"])
        lat_out.append(lin(t_(im["x"]), "vae2llm") + time_embed(t) + sincos_torch(im["pos"], cfg.max_latent_size, H))

    # embedding assembly (scatter by kind)
    n = len(toks)
    x = torch.zeros(n, H)
    for i, tk in enumerate(toks):
        if tk["kind"] == TEXT:
            x[i] = W["language_model.model.embed_tokens.weight"][tk["token"]]
        elif tk["kind"] == VIT:
            x[i] = vit_out[tk["vit"][0]][tk["vit"][1]]
        else:
            x[i] = lat_out[tk["lat"][0]][tk["lat"][1]]

    # §2.4 mask, original order
    allow = torch.zeros(n, n, dtype=torch.bool)
    for qi, q in enumerate(toks):
        for ki, k in enumerate(toks):
            same = q["split"] == k["split"]
            ok = q["doc"] == k["doc"] and (qi >= ki or (same and q["mode"] in (FULL, NOISE)))
            allow[qi, ki] = ok and not (k["mode"] == NOISE and not same)
    add_mask = torch.zeros(n, n).masked_fill(~allow, float("-inf"))

    gen = torch.tensor([tk["kind"] == LAT for tk in toks])
    und = ~gen
    rope = torch.tensor([tk["rope"] for tk in toks])
    nq, nkv, hd = c.num_heads, c.num_kv_heads, c.head_dim

    def rms(y, w):
        y32 = y.float()
        return w * (y32 * torch.rsqrt(y32.pow(2).mean(-1, keepdim=True) + c.rms_norm_eps)).to(y.dtype)

    inv = 1.0 / (c.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.int64).float() / hd))
    fr = rope[:, None].float() * inv[None]
    cos, sin = torch.cat([fr, fr], -1).cos()[:, None], torch.cat([fr, fr], -1).sin()[:, None]
    rot = lambda y: torch.cat([-y[..., hd // 2:], y[..., :hd // 2]], -1)  # noqa: E731
    experts = (("", und), ("_moe_gen", gen))
    for i in range(c.num_layers):
        L = f"language_model.model.layers.{i}."
        Q, K, V = torch.zeros(n, nq, hd), torch.zeros(n, nkv, hd), torch.zeros(n, nkv, hd)
        for e, idx in experts:
            h = rms(x[idx], W[L + f"input_layernorm{e}.weight"])
            Q[idx] = rms(lin(h, L + f"self_attn.q_proj{e}").view(-1, nq, hd), W[L + f"self_attn.q_norm{e}.weight"])
            K[idx] = rms(lin(h, L + f"self_attn.k_proj{e}").view(-1, nkv, hd), W[L + f"self_attn.k_norm{e}.weight"])
            V[idx] = lin(h, L + f"self_attn.v_proj{e}").view(-1, nkv, hd)
        Q, K = Q * cos + rot(Q) * sin, K * cos + rot(K) * sin
        K, V = (y.repeat_interleave(nq // nkv, dim=1) for y in (K, V))
        s = torch.einsum("qhd,khd->hqk", Q, K) / math.sqrt(hd) + add_mask
        ctx = torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), V).reshape(n, nq * hd)
        new = x.clone()
        for e, idx in experts:
            y = x[idx] + lin(ctx[idx], L + f"self_attn.o_proj{e}", bias=False)
            mlp = "mlp" + e
            g = rms(y, W[L + f"post_attention_layernorm{e}.weight"])
            y = y + lin(torch.nn.functional.silu(lin(g, L + f"{mlp}.gate_proj", False)) * lin(g, L + f"{mlp}.up_proj", False),
                        L + f"{mlp}.down_proj", False)
            new[idx] = y
        x = new
    out = torch.zeros_like(x)
    out[und] = rms(x[und], W["language_model.model.norm.weight"])
    out[gen] = rms(x[gen], W["language_model.model.norm_moe_gen.weight"])
    ce_idx = [i for i, tk in enumerate(toks) if tk["ce"]]
    logits = out[ce_idx] @ W["language_model.lm_head.weight"].T
    velocity = lin(out[gen], "llm2vae")
    return logits.numpy(), velocity.numpy(), ce_idx, [i for i, tk in enumerate(toks) if tk["kind"] == LAT]


# ------------------------------------------------------------------ the physically reordered JAX batch
def jax_batch(cfg, toks, vit_images, lat_images, rng, und_pad=3, gen_pad=2, vit_pad=2):
    und = [i for i, tk in enumerate(toks) if tk["kind"] != LAT]
    gen = [i for i, tk in enumerate(toks) if tk["kind"] == LAT]
    phys = list(rng.permutation(und)) + [None] * und_pad + list(rng.permutation(gen)) + [None] * gen_pad
    u, t = len(und) + und_pad, len(phys)
    # ViT patch stream: images back to back, then pads
    offsets = np.cumsum([0] + [len(im["pos"]) for im in vit_images])
    patches = np.concatenate([im["patches"] for im in vit_images] + [np.zeros((vit_pad, vit_images[0]["patches"].shape[1]))])
    vit_pos = np.concatenate([im["pos"] for im in vit_images] + [np.zeros(vit_pad, int)])
    vit_img = np.concatenate([np.full(len(im["pos"]), k) for k, im in enumerate(vit_images)] + [np.full(vit_pad, -1)])
    b = {k: np.zeros(t, np.int32) for k in ("tokens", "kind", "order", "rope", "vit_row")}
    for k in ("doc", "split"):
        b[k] = np.full(t, -1, np.int32)
    b["mode"] = np.zeros(t, np.int32)
    z = t - u
    dl = cfg.latent_patch_size ** 2 * cfg.vae.z_channels
    x_t, tt = np.zeros((z, dl)), np.zeros(z)
    lat_pos, lat_img = np.zeros(z, np.int32), np.full(z, -1, np.int32)
    for p, i in enumerate(phys):
        if i is None:
            continue
        tk = toks[i]
        for k in ("doc", "split", "mode", "kind", "rope"):
            b[k][p] = tk[k]
        b["order"][p] = i
        if tk["kind"] == TEXT:
            b["tokens"][p] = tk["token"]
        elif tk["kind"] == VIT:
            b["vit_row"][p] = offsets[tk["vit"][0]] + tk["vit"][1]
        else:
            im = lat_images[tk["lat"][0]]
            x_t[p - u], tt[p - u] = im["x"][tk["lat"][1]], im["t"]
            lat_pos[p - u], lat_img[p - u] = im["pos"][tk["lat"][1]], tk["lat"][0]
    ce = [phys.index(i) for i, tk in enumerate(toks) if tk["ce"]] + [0]
    b.update(vit_patches=patches.astype(np.float32), vit_pos=vit_pos.astype(np.int32),
             vit_image=vit_img.astype(np.int32), latent_pos=lat_pos, latent_image=lat_img,
             ce_pos=np.asarray(ce, np.int32), ce_valid=np.asarray([True] * (len(ce) - 1) + [False]))
    batch = {k: jnp.asarray(v[None]) for k, v in b.items()}
    return batch, jnp.asarray(x_t[None], jnp.float32), jnp.asarray(tt[None], jnp.float32), phys, u


def test_packed_forward_matches_torch_reference():
    cfg = load_config("configs/sgt_tiny.py").model
    assert cfg.dtype == "float32"
    sd = random_state_dict(cfg)
    rng = np.random.default_rng(1)
    toks, vit_images, lat_images = build_pack(cfg, rng)
    ref_logits, ref_vel, ce_idx, lat_idx = torch_reference(cfg, sd, toks, vit_images, lat_images)

    model = Bagel(cfg, rngs=nnx.Rngs(0), with_vae=False)
    state = nnx.state(model, nnx.Param)
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, bagel_state_dict_to_params(sd, cfg)))
    nnx.update(model, state)
    batch, x_t, t, phys, u = jax_batch(cfg, toks, vit_images, lat_images, rng)
    graphdef, st = nnx.split(model)

    @jax.jit
    def run(st, batch, x_t, t):
        m = nnx.merge(graphdef, st)
        ce_hidden, velocity = m.forward(batch, x_t, t)
        return m.lm_logits(ce_hidden), velocity

    logits, velocity = (np.asarray(a)[0] for a in run(st, batch, x_t, t))
    assert np.isfinite(logits).all() and np.isfinite(velocity).all()
    np.testing.assert_allclose(logits[:-1], ref_logits, atol=ATOL, rtol=RTOL)  # last CE slot is padding
    rows = [phys.index(i) - u for i in lat_idx]  # latent row of each original latent token
    np.testing.assert_allclose(velocity[rows], ref_vel, atol=ATOL, rtol=RTOL)
    assert np.abs(ref_vel).max() > 1e-2 and np.abs(ref_logits).max() > 1e-1  # non-trivial signals
