"""OmniGen2 DiT (JAX) vs a PyTorch reference laid out after the official ``OmniGen2Transformer2DModel``
(tests/parity/omnigen2_reference.py), fp32, tiny random config, weights through the conversion table.

The batch exercises everything the forward has: two samples with different target sizes (non-square),
different caption lengths (right padding), one sample with two reference images of different sizes and
one with a single reference (so a reference slot is empty), several timesteps including 0 and 1; and
the same without reference images. Every reference-model parameter is random (norm weights around 1;
the zero-initialised modulation and output layers too). Tolerance: max |Δ| <= 2e-5 on velocities of
O(1) (observed ~1e-6).
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
pytest.importorskip("diffusers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.checkpoint.omnigen2_table import dit_table  # noqa: E402
from sgt_jax.checkpoint.table import state_dict_to_tree, tree_to_state_dict  # noqa: E402
from sgt_jax.models import omnigen2_dit as dit  # noqa: E402
from sgt_jax.models import omnigen2_inputs as inputs  # noqa: E402
from tests.parity.omnigen2_reference import OmniGen2Reference, randomize_  # noqa: E402

ATOL = 2e-5
C = dit.tiny_config()
FORWARD = jax.jit(lambda m, *a: m(*a))  # one compile per input shape for the whole module


def reference_config(c):
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in c.to_dict().items()}


def load_jax(sd, c=C):
    params = state_dict_to_tree(dit_table(c), sd)
    model = dit.abstract_dit(c)
    graphdef, state, rest = nnx.split(model, nnx.Param, ...)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, params))
    return nnx.merge(graphdef, state, rest), params


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    ref = OmniGen2Reference(reference_config(C)).eval()
    randomize_(ref, seed=1)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model, params = load_jax(sd)
    return ref, model, sd, params


def make_batch(seed, with_refs):
    rng = np.random.default_rng(seed)
    ch = C.in_channels
    targets = [rng.standard_normal((ch, 6, 4)).astype(np.float32),   # token grid 3 x 2
               rng.standard_normal((ch, 4, 8)).astype(np.float32)]   # token grid 2 x 4
    text = rng.standard_normal((2, 9, C.text_feat_dim)).astype(np.float32)
    mask = np.zeros((2, 9), bool)
    mask[0, :9] = True
    mask[1, :5] = True
    refs = None
    if with_refs:
        refs = [[rng.standard_normal((ch, 4, 6)).astype(np.float32),   # 2 x 3 tokens
                 rng.standard_normal((ch, 8, 2)).astype(np.float32)],  # 4 x 1 tokens
                [rng.standard_normal((ch, 2, 4)).astype(np.float32)]]  # 1 x 2 tokens
    return targets, text, mask, refs


def run_both(ref, model, batch, t):
    targets, text, mask, refs = batch
    with torch.no_grad():
        want = ref([torch.from_numpy(z) for z in targets], torch.tensor(t, dtype=torch.float32),
                   torch.from_numpy(text), torch.from_numpy(mask),
                   None if refs is None else [[torch.from_numpy(z) for z in s] for s in refs])
    nhwc = lambda z: np.moveaxis(z, 0, -1)  # noqa: E731
    x_tok, x_hw = inputs.pack_latents([nhwc(z) for z in targets], C.patch_size)
    r_tok = r_hw = None
    if refs is not None:
        r_tok, r_hw = inputs.pack_references([[nhwc(z) for z in s] for s in refs], C.patch_size)
    v = FORWARD(model, x_tok, x_hw, jnp.asarray(t, jnp.float32), text, mask, r_tok, r_hw)
    got = inputs.unpack_latents(np.asarray(v), x_hw, C.patch_size)
    return [w.numpy() for w in want], [np.moveaxis(g, -1, 0) for g in got]


@pytest.mark.parametrize("with_refs", [True, False])
def test_forward_matches_reference(models, with_refs):
    ref, model, _, _ = models
    batch = make_batch(0, with_refs)
    worst = 0.0
    for t in ([0.0, 1.0], [0.3, 0.85], [0.5, 0.02]):
        want, got = run_both(ref, model, batch, t)
        for w, g in zip(want, got):
            assert g.shape == w.shape
            assert np.abs(w).max() > 0.1  # a real signal, not zeros
            worst = max(worst, float(np.abs(g - w).max()))
    assert worst <= ATOL, worst


def test_references_change_the_output(models):
    """The reference path is live: dropping the references changes the target velocity."""
    ref, model, _, _ = models
    _, with_refs = run_both(ref, model, make_batch(0, True), [0.4, 0.4])
    _, without = run_both(ref, model, make_batch(0, False), [0.4, 0.4])
    assert np.abs(with_refs[0] - without[0]).max() > 1e-3


def test_table_round_trip_is_exact(models):
    _, _, sd, params = models
    back = tree_to_state_dict(dit_table(C), params)
    assert sorted(back) == sorted(sd)
    for k in sd:
        assert back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]), k


def test_remat_chunked_equal_dense(models):
    """``remat_policy='full'`` and ``attention_impl='chunked'`` (blocks of 8 tokens, several per
    sequence) give the same velocity as the dense forward."""
    ref, model, sd, _ = models
    c2 = dit.tiny_config()
    c2.update(dict(remat_policy="full", attention_impl="chunked", attention_chunk=8))
    model2, _ = load_jax(sd, c2)
    targets, text, mask, refs = make_batch(1, True)
    nhwc = lambda z: np.moveaxis(z, 0, -1)  # noqa: E731
    x_tok, x_hw = inputs.pack_latents([nhwc(z) for z in targets], C.patch_size)
    r_tok, r_hw = inputs.pack_references([[nhwc(z) for z in s] for s in refs], C.patch_size)
    args = (x_tok, x_hw, jnp.asarray([0.2, 0.6]), text, mask, r_tok, r_hw)
    a = FORWARD(model, *args)
    b = FORWARD(model2, *args)
    valid = np.asarray(inputs.grid_ids(jnp.asarray(x_hw), x_tok.shape[1])[2])
    np.testing.assert_allclose(np.asarray(a)[valid], np.asarray(b)[valid], atol=1e-5)


def test_gradients_match_reference(models):
    """Gradients of a fixed linear read-out of the velocity w.r.t. every DiT parameter and the text
    condition (the path into the MLLM in SGT) equal PyTorch autograd's, per state-dict tensor (fp32)."""
    ref, model, _, _ = models
    targets, text, mask, refs = make_batch(2, True)
    nhwc = lambda z: np.moveaxis(z, 0, -1)  # noqa: E731
    x_tok, x_hw = inputs.pack_latents([nhwc(z) for z in targets], C.patch_size)
    r_tok, r_hw = inputs.pack_references([[nhwc(z) for z in s] for s in refs], C.patch_size)
    t = [0.3, 0.85]
    valid = np.asarray(inputs.grid_ids(jnp.asarray(x_hw), x_tok.shape[1])[2])
    w_tok = np.random.default_rng(3).standard_normal(x_tok.shape).astype(np.float32) * valid[..., None]

    ref.zero_grad()
    text_t = torch.from_numpy(text).requires_grad_(True)
    out = ref([torch.from_numpy(z) for z in targets], torch.tensor(t), text_t, torch.from_numpy(mask),
              [[torch.from_numpy(z) for z in s] for s in refs])
    w_ref = [torch.from_numpy(np.moveaxis(w, -1, 0).copy()) for w in inputs.unpack_latents(w_tok, x_hw, C.patch_size)]
    sum((o * w).sum() for o, w in zip(out, w_ref)).backward()
    want = {k: p.grad.numpy() for k, p in ref.named_parameters() if p.grad is not None}

    graphdef, state, rest = nnx.split(model, nnx.Param, ...)

    def loss(state, text):
        v = nnx.merge(graphdef, state, rest)(x_tok, x_hw, jnp.asarray(t), text, mask, r_tok, r_hw)
        return jnp.sum(v * w_tok)

    g_state, g_text = jax.jit(jax.grad(loss, argnums=(0, 1)))(state, jnp.asarray(text))
    got = tree_to_state_dict(dit_table(C), jax.tree.map(np.asarray, g_state.to_pure_dict()))
    assert set(want) <= set(got) and len(want) > 0.9 * len(got)
    worst = {}
    for k, w in want.items():
        scale = max(float(np.abs(w).max()), 1e-3)
        worst[k] = float(np.abs(got[k] - w).max()) / scale
    assert max(worst.values()) <= 1e-4, sorted(worst.items(), key=lambda kv: -kv[1])[:5]
    scale = float(np.abs(text_t.grad.numpy()).max())
    assert scale > 1e-3
    assert float(np.abs(np.asarray(g_text) - text_t.grad.numpy()).max()) <= 1e-4 * scale
