"""PyTorch reference models with random weights, shared by the parity tests (imported after their
``pytest.importorskip("torch")``)."""

import diffusers
import torch


def random_diffusers_vae(c, *, seed: int, norm_jitter: float = 0.2, with_factors: bool = True):
    """A diffusers ``AutoencoderKL`` shaped like the FLUX VAE config ``c`` (no quant convs, mid-block
    attention), every weight random: matrices/kernels at unit-ish output scale, norm weights
    ``1 + norm_jitter·N(0,1)``, biases and other vectors ``0.1·N(0,1)``."""
    n = len(c.ch_mult)
    factors = dict(scaling_factor=c.scale_factor, shift_factor=c.shift_factor) if with_factors else {}
    model = diffusers.AutoencoderKL(
        in_channels=c.in_channels, out_channels=c.out_channels,
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        block_out_channels=tuple(c.ch * m for m in c.ch_mult), layers_per_block=c.num_res_blocks,
        act_fn="silu", latent_channels=c.z_channels, norm_num_groups=c.num_groups,
        use_quant_conv=False, use_post_quant_conv=False, mid_block_add_attention=True, **factors,
    ).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + norm_jitter * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
    return model
