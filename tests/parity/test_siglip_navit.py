"""SigLIP NaViT (JAX) vs transformers ``SiglipVisionModel`` (PyTorch), fp32, tiny random weights.

Two images of different sizes are packed (with padding) into one patch stream and run through our
ViT once; each image alone goes through HF. HF's ``SiglipVisionEmbeddings`` adds
``position_embedding(self.position_ids)`` where ``position_ids`` is a buffer ``arange(num_positions)``,
i.e. it assumes the full G x G grid. BAGEL's NaViT instead indexes the same table with the top-left
sub-grid ids ``row*G + col``. To compare the *whole* model exactly (embeddings included), the test
overwrites HF's ``position_ids`` buffer per image with exactly those ids; everything else in HF runs
unchanged (Conv2d patch embedding, eager attention, tanh-GELU MLP, post_layernorm).

The HF Conv2d patch weight reaches our Linear patch embedding through ``vit_state_dict_to_params``,
which accepts the Conv2d form and converts (O,C,kh,kw) -> (O,kh,kw,C) -> (O, kh*kw*C).
Tolerance: fp32 everywhere, max abs diff <= 2e-5 on outputs of O(1) (observed 1.8e-6, outputs up to 3.8).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint.vit_table import params_to_vit_state_dict, vit_state_dict_to_params  # noqa: E402
from sgt_jax.configs_util import load_config  # noqa: E402
from sgt_jax.models.siglip_navit import SiglipNaViT, patchify  # noqa: E402

ATOL = 2e-5


def _hf_model(cv):
    cfg = transformers.SiglipVisionConfig(
        hidden_size=cv.hidden_size, intermediate_size=cv.intermediate_size, num_attention_heads=cv.num_heads,
        num_hidden_layers=cv.num_layers, patch_size=cv.patch_size,
        image_size=cv.patch_size * cv.max_patches_per_side, layer_norm_eps=cv.layer_norm_eps,
        hidden_act="gelu_pytorch_tanh", vision_use_head=False, attention_dropout=0.0,
    )
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    model = transformers.SiglipVisionModel(cfg).eval()
    with torch.no_grad():  # HF's init leaves biases/LN at trivial values: randomise everything
        for name, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn_like(p) / p[0].numel() ** 0.5)
            elif "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.copy_(0.2 * torch.randn_like(p))
    return model


def _hf_image(model, image, pos):
    """One image [H,W,3] through HF with BAGEL's position ids -> [gh*gw, Hv]."""
    getattr(model, "vision_model", model).embeddings.position_ids = torch.as_tensor(pos, dtype=torch.long)[None]
    px = torch.as_tensor(image).permute(2, 0, 1)[None].float()
    with torch.no_grad():
        return model(pixel_values=px).last_hidden_state[0].numpy()


@pytest.fixture(scope="module")
def setup():
    cv = load_config("configs/sgt_tiny.py").model.vit
    hf = _hf_model(cv)
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    # transformers 5 drops the ``vision_model.`` wrapper of 4.x; BAGEL's files use ``vit_model.vision_model.``.
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in sd) else ""
    params = vit_state_dict_to_params(sd, cv, prefix=prefix)
    return cv, hf, sd, params, prefix


def _jax_model(cv, params, **kw):
    """Build abstractly (no random init compute) and fill in the converted weights."""
    abstract = nnx.eval_shape(lambda: SiglipNaViT(cv, rngs=nnx.Rngs(1), **kw))
    graphdef, state, rest = nnx.split(abstract, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest)


@pytest.mark.parametrize("impl", ["dense", "chunked"])
def test_packed_stream_matches_hf_per_image(setup, impl):
    cv, hf, _, params, _ = setup
    ps = cv.patch_size
    rng = np.random.default_rng(0)
    sizes = [(3, 2), (2, 4)]  # (rows, cols) in patches: different shapes and aspect ratios
    images = [rng.uniform(-1, 1, (r * ps, c * ps, 3)).astype(np.float32) for r, c in sizes]
    pieces = [patchify(im, ps, cv.max_patches_per_side) for im in images]
    P = 17  # 6 + 8 real rows + 3 padding rows
    # Pack 0: image A then B then padding. Pack 1: padding first, then B, then A (order must not matter).
    layouts = [[(0, 0), (1, 6)], [(1, 3), (0, 11)]]
    patches = np.zeros((2, P, 3 * ps * ps), np.float32)
    pos = np.zeros((2, P), np.int32)
    img = np.full((2, P), -1, np.int32)
    patches[1, :3] = 7.0  # garbage in padding rows must not leak into real rows
    for b, layout in enumerate(layouts):
        for i, start in layout:
            n = len(pieces[i][1])
            patches[b, start:start + n], pos[b, start:start + n], img[b, start:start + n] = (
                pieces[i][0], pieces[i][1], i)
    model = _jax_model(cv, params, attention_impl=impl, attention_chunk=5)
    out = np.asarray(jax.jit(lambda m, *a: m(*a))(model, jnp.asarray(patches), jnp.asarray(pos), jnp.asarray(img)))
    assert np.isfinite(out).all()
    for i, (im, (_, pid)) in enumerate(zip(images, pieces)):
        ref = _hf_image(hf, im, pid)
        for b, layout in enumerate(layouts):
            start = dict(layout)[i]
            got = out[b, start:start + len(pid)]
            err = np.abs(got - ref).max()
            assert err <= ATOL, f"image {i} in pack {b} ({impl}): max abs diff {err:.2e} > {ATOL}"
            assert np.abs(ref).max() > 0.1  # outputs are not trivially small


def test_export_restores_bagel_linear_form(setup):
    """params -> BAGEL torch naming: the patch embedding comes back in Linear form equal to the
    flattened HF conv weight, everything else bit-identical to the HF state dict."""
    cv, _, sd, params, prefix = setup
    key = prefix + "embeddings.patch_embedding.weight"
    back = params_to_vit_state_dict(params, cv, prefix=prefix)
    assert set(back) == set(sd)
    conv, lin = sd[key], back[key]
    assert lin.shape == (cv.hidden_size, 3 * cv.patch_size ** 2)
    np.testing.assert_array_equal(lin, conv.transpose(0, 2, 3, 1).reshape(conv.shape[0], -1))
    for k in back:
        if k != key:
            np.testing.assert_array_equal(back[k], sd[k], err_msg=k)
