"""OmniGen2 assembled: the MLLM (Qwen2.5-VL), the diffusion transformer and the FLUX VAE in one NNX module.

    model = OmniGen2(config.model, rngs=nnx.Rngs(0))       # config.model.family == "omnigen2"
    model.mllm   # sgt_jax/models/qwen2_5_vl.py Qwen2_5_VL   (trainable in SGT, vision tower included)
    model.dit    # sgt_jax/models/omnigen2_dit.py OmniGen2DiT (trainable)
    model.vae    # sgt_jax/models/flux_vae.py FluxVAE         (frozen; absent with with_vae=False)

The parameter tree is ``{"mllm", "dit", "vae"}``: the tree ``checkpoint/omnigen2_folder.import_folder``
returns, so an imported workdir restores into this module (``checkpoint.init_from``) and a training
checkpoint exports back to the folder layout. Official counterpart: VectorSpaceLab/OmniGen2
``omnigen2/pipelines/omnigen2/pipeline_omnigen2.py`` (``mllm``, ``transformer``, ``vae``) and song2yu/SGT
``OmniGen2/train.py`` (the text encoder as a full ``Qwen2_5_VLForConditionalGeneration``).

``condition`` runs the MLLM once and returns what both SGT losses need: the last hidden states (the DiT's
condition, image-pad positions included, gradients flowing into the MLLM) and the hidden states for the
LM head (the VQA cross-entropy is taken on the labelled positions only: ``model.mllm.logits``).
"""

from __future__ import annotations

import ml_collections
from flax import nnx

from sgt_jax.models import omnigen2_inputs as inputs
from sgt_jax.models.flux_vae import FluxVAE
from sgt_jax.models.omnigen2_dit import OmniGen2DiT
from sgt_jax.models.qwen2_5_vl import Qwen2_5_VL, VisionInputs

FAMILY = "omnigen2"


def check_model_config(model_cfg: ml_collections.ConfigDict) -> None:
    """One clear line for a model section that cannot be an OmniGen2 (before anything is built)."""
    if str(model_cfg.family) != FAMILY:
        raise ValueError(f"config.model.family={model_cfg.family!r}: the OmniGen2 model needs 'omnigen2'")
    if int(model_cfg.dit.text_feat_dim) != int(model_cfg.mllm.text.hidden_size):
        raise ValueError(f"config.model.dit.text_feat_dim={model_cfg.dit.text_feat_dim} must equal "
                         f"config.model.mllm.text.hidden_size={model_cfg.mllm.text.hidden_size} (the DiT reads "
                         "the MLLM's last hidden states)")
    if int(model_cfg.dit.in_channels) != int(model_cfg.vae.z_channels):
        raise ValueError(f"config.model.dit.in_channels={model_cfg.dit.in_channels} must equal "
                         f"config.model.vae.z_channels={model_cfg.vae.z_channels}")


class OmniGen2(nnx.Module):
    """``mllm`` + ``dit`` (+ ``vae``) built from ``config.model`` (configs/omnigen2_sgt.py)."""

    def __init__(self, model_cfg: ml_collections.ConfigDict, *, rngs: nnx.Rngs, with_vae: bool = True):
        check_model_config(model_cfg)
        self.mllm = Qwen2_5_VL(model_cfg.mllm, rngs=rngs)
        self.dit = OmniGen2DiT(model_cfg.dit, rngs=rngs)
        if with_vae:
            self.vae = FluxVAE(model_cfg.vae, rngs=rngs)

    def condition(self, tokens, positions, doc=None, vision: VisionInputs | None = None, vision_index=None):
        """The MLLM's last hidden states ``[B, T, hidden]`` (after its final norm): the DiT condition and
        the input of ``self.mllm.logits`` for the labelled positions."""
        return self.mllm.hidden_states(tokens, positions, doc, vision=vision, vision_index=vision_index)

    def lm_logits(self, h):
        """The MLLM's LM head on hidden states (fp32 logits): the CE of VQA rows."""
        return self.mllm.logits(h)

    def velocity(self, x_tokens, x_hw, t, hidden, text_mask, ref_tokens=None, ref_hw=None, *, max_len=None):
        """The DiT's velocity for noisy target tokens given the MLLM hidden states (``mllm_condition``
        clips the condition to the rotary tables: its last ``axes_lens[0] - 128`` positions)."""
        if max_len is None:
            max_len = int(self.dit.cfg.axes_lens[0]) - 128
        cond, mask = inputs.mllm_condition(hidden, text_mask, max_len=max_len)
        return self.dit(x_tokens, x_hw, t, cond, mask, ref_tokens, ref_hw)
