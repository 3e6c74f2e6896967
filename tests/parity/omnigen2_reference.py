"""A PyTorch reference of OmniGen2's diffusion transformer, written for the parity tests.

diffusers has no OmniGen2 class, so this module is laid out after the official
``OmniGen2Transformer2DModel`` (VectorSpaceLab/OmniGen2, ``omnigen2/models/transformers/
transformer_omnigen2.py``, ``block_lumina2.py``, ``repo.py``, ``omnigen2/models/attention_processor.py``)
from its description, with its module names, so that ``state_dict()`` has the released key names.
It is built from diffusers parts where OmniGen2 uses the same ones (``Attention``, ``RMSNorm``,
``Timesteps``, ``TimestepEmbedding``, ``LuminaRMSNormZero``, ``LuminaLayerNormContinuous``,
``LuminaFeedForward``, ``get_1d_rotary_pos_embed``, ``apply_rotary_emb``) and, like the official code,
works on *lists* of per-sample latents ``[C, H, W]`` and compacts every sample's joint sequence to
``[valid caption | ref 1 | ... | target | padding]`` with float64 (complex128) rotary tables. It shares
no code with sgt_jax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.models.attention import LuminaFeedForward
from diffusers.models.attention_processor import Attention
from diffusers.models.embeddings import TimestepEmbedding, Timesteps, apply_rotary_emb, get_1d_rotary_pos_embed
from diffusers.models.normalization import LuminaLayerNormContinuous, LuminaRMSNormZero, RMSNorm
from torch import nn


class OmniGen2AttnProcessor:
    """q/k/v, per-head RMSNorm on q and k, interleaved rotary, GQA by repeat_interleave, SDPA with a
    key-padding mask, ``to_out.0``."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 image_rotary_emb=None):
        b, s, _ = hidden_states.shape
        q = attn.to_q(hidden_states)
        k = attn.to_k(hidden_states)
        v = attn.to_v(hidden_states)
        hd = q.shape[-1] // attn.heads
        q = q.view(b, s, -1, hd)
        k = k.view(b, s, -1, hd)
        v = v.view(b, s, -1, hd)
        q = attn.norm_q(q)
        k = attn.norm_k(k)
        q = apply_rotary_emb(q, image_rotary_emb, use_real=False)
        k = apply_rotary_emb(k, image_rotary_emb, use_real=False)
        rep = q.shape[2] // k.shape[2]
        k = k.repeat_interleave(rep, dim=2)
        v = v.repeat_interleave(rep, dim=2)
        mask = attention_mask.bool().view(b, 1, 1, s)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, scale=hd ** -0.5)
        out = out.transpose(1, 2).reshape(b, s, -1).type_as(q)
        return attn.to_out[0](out)


class Block(nn.Module):
    def __init__(self, dim, heads, kv_heads, multiple_of, ffn_dim_multiplier, eps, modulation):
        super().__init__()
        self.modulation = modulation
        self.attn = Attention(query_dim=dim, cross_attention_dim=None, dim_head=dim // heads, qk_norm="rms_norm",
                              heads=heads, kv_heads=kv_heads, eps=eps, bias=False, out_bias=False,
                              processor=OmniGen2AttnProcessor())
        self.feed_forward = LuminaFeedForward(dim, 4 * dim, multiple_of, ffn_dim_multiplier)
        self.norm1 = LuminaRMSNormZero(dim, eps, True) if modulation else RMSNorm(dim, eps=eps)
        self.ffn_norm1 = RMSNorm(dim, eps=eps)
        self.norm2 = RMSNorm(dim, eps=eps)
        self.ffn_norm2 = RMSNorm(dim, eps=eps)

    def forward(self, x, mask, rope, temb=None):
        if self.modulation:
            h, gate_msa, scale_mlp, gate_mlp = self.norm1(x, temb)
            a = self.attn(h, h, attention_mask=mask, image_rotary_emb=rope)
            x = x + gate_msa.unsqueeze(1).tanh() * self.norm2(a)
            f = self.feed_forward(self.ffn_norm1(x) * (1 + scale_mlp.unsqueeze(1)))
            return x + gate_mlp.unsqueeze(1).tanh() * self.ffn_norm2(f)
        h = self.norm1(x)
        x = x + self.norm2(self.attn(h, h, attention_mask=mask, image_rotary_emb=rope))
        return x + self.ffn_norm2(self.feed_forward(self.ffn_norm1(x)))


class TimeCaptionEmbed(nn.Module):
    def __init__(self, hidden, text_dim, eps, timestep_scale):
        super().__init__()
        self.time_proj = Timesteps(256, flip_sin_to_cos=True, downscale_freq_shift=0.0, scale=timestep_scale)
        self.timestep_embedder = TimestepEmbedding(256, min(hidden, 1024))
        self.caption_embedder = nn.Sequential(RMSNorm(text_dim, eps=eps), nn.Linear(text_dim, hidden, bias=True))

    def forward(self, hidden_states, timestep, text):
        proj = self.time_proj(timestep).type_as(hidden_states)
        return self.timestep_embedder(proj), self.caption_embedder(text)


class OmniGen2Reference(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c
        h, p = c["hidden_size"], c["patch_size"]
        pd = p * p * c["in_channels"]
        blk = lambda mod: Block(h, c["num_attention_heads"], c["num_kv_heads"], c["multiple_of"],  # noqa: E731
                                c["ffn_dim_multiplier"], c["norm_eps"], mod)
        self.x_embedder = nn.Linear(pd, h)
        self.ref_image_patch_embedder = nn.Linear(pd, h)
        self.time_caption_embed = TimeCaptionEmbed(h, c["text_feat_dim"], c["norm_eps"], c["timestep_scale"])
        self.noise_refiner = nn.ModuleList([blk(True) for _ in range(c["num_refiner_layers"])])
        self.ref_image_refiner = nn.ModuleList([blk(True) for _ in range(c["num_refiner_layers"])])
        self.context_refiner = nn.ModuleList([blk(False) for _ in range(c["num_refiner_layers"])])
        self.layers = nn.ModuleList([blk(True) for _ in range(c["num_layers"])])
        self.norm_out = LuminaLayerNormContinuous(h, min(h, 1024), elementwise_affine=False, eps=1e-6, bias=True,
                                                  out_dim=pd)
        self.image_index_embedding = nn.Parameter(torch.randn(5, h))
        self.freqs = [get_1d_rotary_pos_embed(d, n, theta=10000, freqs_dtype=torch.float64)
                      for d, n in zip(c["axes_dim_rope"], c["axes_lens"])]

    # ---- helpers ----
    def _patchify(self, z):
        p = self.c["patch_size"]
        ch, hh, ww = z.shape
        return z.view(ch, hh // p, p, ww // p, p).permute(1, 3, 2, 4, 0).flatten(2).flatten(0, 1)

    def _unpatchify(self, tok, hh, ww):
        p = self.c["patch_size"]
        ch = tok.shape[-1] // (p * p)
        return tok.view(hh // p, ww // p, p, p, ch).permute(4, 0, 2, 1, 3).reshape(ch, hh, ww)

    def _freqs(self, ids):
        """ids [S, 3] -> complex [S, head_dim/2], axes concatenated."""
        return torch.cat([f[ids[:, a]] for a, f in enumerate(self.freqs)], dim=-1)

    @staticmethod
    def _pad(seqs, width=None):
        n = max(s.shape[0] for s in seqs)
        out = seqs[0].new_zeros((len(seqs), n) + tuple(seqs[0].shape[1:]))
        mask = torch.zeros(len(seqs), n, dtype=torch.bool)
        for i, s in enumerate(seqs):
            out[i, : s.shape[0]] = s
            mask[i, : s.shape[0]] = True
        return out, mask

    def forward(self, hidden_states, timestep, text, text_mask, ref_images=None):
        """``hidden_states``: list of [C, H, W]; ``ref_images``: per sample None or a list of [C, h, w].
        Returns the list of [C, H, W] velocities."""
        p = self.c["patch_size"]
        b = len(hidden_states)
        ref_images = ref_images or [None] * b
        temb, cap = self.time_caption_embed(hidden_states[0], timestep, text)
        cap_lens = text_mask.sum(dim=1).tolist()

        # Omni-RoPE ids of each sample's compact joint sequence [caption | refs | target]
        cap_f, ref_f, tgt_f, joint_f = [], [], [], []
        for i in range(b):
            n_cap = cap_lens[i]
            ids = [torch.arange(n_cap)[:, None].repeat(1, 3)]
            shift = n_cap
            per_ref = []
            for z in ref_images[i] or []:
                hh, ww = z.shape[1] // p, z.shape[2] // p
                rows, cols = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
                rid = torch.stack([torch.full((hh * ww,), shift), rows.flatten(), cols.flatten()], dim=1)
                per_ref.append(self._freqs(rid))
                ids.append(rid)
                shift += max(hh, ww)
            hh, ww = hidden_states[i].shape[1] // p, hidden_states[i].shape[2] // p
            rows, cols = torch.meshgrid(torch.arange(hh), torch.arange(ww), indexing="ij")
            tid = torch.stack([torch.full((hh * ww,), shift), rows.flatten(), cols.flatten()], dim=1)
            ids.append(tid)
            cap_f.append(self._freqs(ids[0]))
            ref_f.extend(per_ref)
            tgt_f.append(self._freqs(tid))
            joint_f.append(self._freqs(torch.cat(ids, dim=0)))

        # context refiner over the (padded) caption, no temb
        cap_rope = self._pad(cap_f)[0]
        if cap_rope.shape[1] < cap.shape[1]:
            cap_rope = F.pad(cap_rope, (0, 0, 0, cap.shape[1] - cap_rope.shape[1]))
        for blk in self.context_refiner:
            cap = blk(cap, text_mask.bool(), cap_rope)

        # noise refiner over the target tokens
        x, x_mask = self._pad([self.x_embedder(self._patchify(z)) for z in hidden_states])
        x_rope = self._pad(tgt_f)[0]
        for blk in self.noise_refiner:
            x = blk(x, x_mask, x_rope, temb)

        # reference refiner: every image its own row, with the sample's temb
        refs, owners = [], []
        for i in range(b):
            for j, z in enumerate(ref_images[i] or []):
                refs.append(self.ref_image_patch_embedder(self._patchify(z)) + self.image_index_embedding[j])
                owners.append(i)
        if refs:
            r, r_mask = self._pad(refs)
            r_rope = self._pad(ref_f)[0]
            for blk in self.ref_image_refiner:
                r = blk(r, r_mask, r_rope, temb[owners])

        # joint sequence
        seqs, k = [], 0
        for i in range(b):
            parts = [cap[i, : cap_lens[i]]]
            for _ in ref_images[i] or []:
                parts.append(r[k, : r_mask[k].sum()])
                k += 1
            parts.append(x[i, : x_mask[i].sum()])
            seqs.append(torch.cat(parts, dim=0))
        joint, joint_mask = self._pad(seqs)
        joint_rope = self._pad(joint_f)[0]
        for blk in self.layers:
            joint = blk(joint, joint_mask, joint_rope, temb)
        joint = self.norm_out(joint, temb)

        out = []
        for i in range(b):
            n_x = int(x_mask[i].sum())
            n = int(joint_mask[i].sum())
            hh, ww = hidden_states[i].shape[1:]
            out.append(self._unpatchify(joint[i, n - n_x: n], hh, ww))
        return out


def randomize_(model: nn.Module, seed: int) -> None:
    """Random values for every parameter (norm weights around 1, the zero-initialised modulation and
    output layers too), so that no term of the forward is trivially zero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, prm in model.named_parameters():
            if prm.ndim == 1 and "norm" in name and name.endswith("weight"):
                prm.copy_(1.0 + 0.2 * torch.randn(prm.shape, generator=g))
            else:
                fan_in = prm.shape[-1] if prm.ndim > 1 else 16
                prm.copy_(torch.randn(prm.shape, generator=g) / fan_in ** 0.5)


# ---- the denoising loop ----------------------------------------------------------------------------


def reference_timesteps(num_steps: int, num_tokens: int) -> torch.Tensor:
    """OmniGen2's ``FlowMatchEulerDiscreteScheduler.set_timesteps`` with the dynamic shift: linspace(0, 1,
    N+1) without its end, ``t / (m - m·t + t)`` with m = sqrt(latent pixels) / 40, then 1 appended."""
    t = torch.linspace(0, 1, num_steps + 1)[:-1]
    m = num_tokens ** 0.5 / 40
    t = t / (m - m * t + t)
    return torch.cat([t, torch.ones(1)])


@torch.no_grad()
def reference_denoise(model, latents, text, mask, neg_text, neg_mask, refs, *, num_steps, text_scale,
                      image_scale, cfg_range):
    """The official pipeline's processing loop, one transformer call per CFG pass: at step i guidance is on
    iff cfg_range[0] <= i/N <= cfg_range[1]; with references and both scales > 1 three passes
    (prompt + refs, negative + refs, negative without refs), with the text scale alone two (the second
    without refs), otherwise the conditional pass only; the scheduler's Euler step in fp32. ``latents``:
    list of [C, H, W]; ``refs``: per sample a list of [C, h, w] or None."""
    ts = reference_timesteps(num_steps, latents[0].shape[1] * latents[0].shape[2])
    b = len(latents)
    for i in range(num_steps):
        t = ts[i].expand(b).to(latents[0].dtype)
        active = cfg_range[0] <= i / num_steps <= cfg_range[1]
        tg, ig = (text_scale, image_scale) if active else (1.0, 1.0)
        v_c = model(latents, t, text, mask, refs)
        if tg > 1 and ig > 1 and refs is not None:
            v_r = model(latents, t, neg_text, neg_mask, refs)
            v_u = model(latents, t, neg_text, neg_mask, None)
            v = [u + ig * (r - u) + tg * (c - r) for c, r, u in zip(v_c, v_r, v_u)]
        elif tg > 1:
            v_u = model(latents, t, neg_text, neg_mask, None)
            v = [u + tg * (c - u) for c, u in zip(v_c, v_u)]
        else:
            v = v_c
        dt = ts[i + 1] - ts[i]
        latents = [(x.float() + dt * vv.float()).to(vv.dtype) for x, vv in zip(latents, v)]
    return latents
