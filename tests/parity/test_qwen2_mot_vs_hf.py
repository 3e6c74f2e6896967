"""Qwen2 MoT vs transformers Qwen3ForCausalLM (Qwen2 + per-head q/k RMSNorm before RoPE, q/k/v bias).

Qwen3 with ``attention_bias=True`` also has an o_proj bias: it is zeroed (BAGEL has none). Tiny random
config, fp32, every weight (norms included) randomised. Tolerance: logits atol 2e-5, rtol 1e-5.
"""

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="needs the [torch] extra")
transformers = pytest.importorskip("transformers", reason="needs the [torch] extra")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402

from sgt_jax.models.attention import TokenMeta  # noqa: E402
from sgt_jax.models.qwen2_mot import Qwen2MoT  # noqa: E402

ATOL, RTOL = 2e-5, 1e-5


def hf_model(llm):
    cfg = transformers.Qwen3Config(
        vocab_size=llm.vocab_size, hidden_size=llm.hidden_size, intermediate_size=llm.intermediate_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_heads,
        num_key_value_heads=llm.num_kv_heads, head_dim=llm.head_dim, rms_norm_eps=llm.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": llm.rope_theta}, attention_bias=True,
        tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(0)
    model = transformers.Qwen3ForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            elif "o_proj.bias" in name:
                p.zero_()
            else:
                p.copy_(0.1 * torch.randn_like(p))
    return model


def expert_from_hf(sd, i, llm):
    """The und-expert sub-tree of layer i from a Qwen3 state dict (Linear (out,in) -> kernel (in,out))."""
    h, nq, nkv, hd = llm.hidden_size, llm.num_heads, llm.num_kv_heads, llm.head_dim
    g = lambda k: sd[f"model.layers.{i}.{k}"].numpy()  # noqa: E731
    return {
        "input_norm": {"scale": g("input_layernorm.weight")},
        "post_norm": {"scale": g("post_attention_layernorm.weight")},
        "q_proj": {"kernel": g("self_attn.q_proj.weight").T.reshape(h, nq, hd),
                   "bias": g("self_attn.q_proj.bias").reshape(nq, hd)},
        "k_proj": {"kernel": g("self_attn.k_proj.weight").T.reshape(h, nkv, hd),
                   "bias": g("self_attn.k_proj.bias").reshape(nkv, hd)},
        "v_proj": {"kernel": g("self_attn.v_proj.weight").T.reshape(h, nkv, hd),
                   "bias": g("self_attn.v_proj.bias").reshape(nkv, hd)},
        "o_proj": {"kernel": g("self_attn.o_proj.weight").T.reshape(nq, hd, h)},
        "q_norm": {"scale": g("self_attn.q_norm.weight")},
        "k_norm": {"scale": g("self_attn.k_norm.weight")},
        "mlp": {n: {"kernel": g(f"mlp.{n}.weight").T} for n in ("gate_proj", "up_proj", "down_proj")},
    }


def load_into(model, hf, llm):
    sd = {k: v.detach() for k, v in hf.state_dict().items()}
    per_layer = [expert_from_hf(sd, i, llm) for i in range(llm.num_layers)]
    und = jax.tree.map(lambda *a: np.stack(a), *per_layer)
    pure = {
        "embed_tokens": {"embedding": sd["model.embed_tokens.weight"].numpy()},
        "layers": {"und": und, "gen": und},  # gen = copy of und: routing must not change the result
        "norm": {"scale": sd["model.norm.weight"].numpy()},
        "norm_gen": {"scale": sd["model.norm.weight"].numpy()},
        "lm_head": {"kernel": sd["lm_head.weight"].numpy().T},
    }
    state = nnx.state(model, nnx.Param)
    want = jax.tree.map(lambda a: a.shape, state.to_pure_dict())
    got = jax.tree.map(lambda a: a.shape, pure)
    assert want == got
    state.replace_by_pure_dict(jax.tree.map(jnp.asarray, pure))
    nnx.update(model, state)


@pytest.fixture(scope="module")
def models():
    from sgt_jax.configs_util import load_config

    cfg = load_config("configs/sgt_tiny.py").model
    hf = hf_model(cfg.llm)
    model = Qwen2MoT(cfg, rngs=nnx.Rngs(0))
    load_into(model, hf, cfg.llm)
    return cfg, hf, model


def run(model, tokens, meta, rope, num_und):
    graphdef, state = nnx.split(model)

    @jax.jit
    def f(state, tokens, meta, rope):
        m = nnx.merge(graphdef, state)
        h, _, _ = m(m.embed(tokens), meta, rope, num_und=num_und)
        return m.logits(h)

    return np.asarray(f(state, tokens, meta, rope))


def pack(perm_seed=None):
    """Two causal text docs (9 and 7 tokens) + 4 pad tokens; optionally physically permuted."""
    rng = np.random.default_rng(5)
    lens = (9, 7)
    ids = [rng.integers(5, 500, n) for n in lens]
    tokens = np.concatenate(ids + [np.zeros(4, np.int64)])
    doc = np.concatenate([np.full(n, d) for d, n in enumerate(lens)] + [np.full(4, -1)])
    split = doc.copy()
    mode = np.zeros_like(doc)
    order = np.arange(tokens.size)
    rope = np.concatenate([np.arange(n) for n in lens] + [np.zeros(4, np.int64)])
    perm = np.arange(tokens.size) if perm_seed is None else np.random.default_rng(perm_seed).permutation(tokens.size)
    arr = lambda a: jnp.asarray(a[perm][None], jnp.int32)  # noqa: E731
    return ids, perm, arr(tokens), TokenMeta(arr(doc), arr(split), arr(mode), arr(order)), arr(rope)


def hf_logits(hf, ids):
    with torch.no_grad():
        return [hf(torch.as_tensor(x[None])).logits[0].numpy() for x in ids]


def test_und_expert_text_pack_matches_hf(models):
    cfg, hf, model = models
    ids, _, tokens, meta, rope = pack()
    got = run(model, tokens, meta, rope, num_und=tokens.shape[1])[0]
    ref = hf_logits(hf, ids)
    np.testing.assert_allclose(got[:9], ref[0], atol=ATOL, rtol=RTOL)
    np.testing.assert_allclose(got[9:16], ref[1], atol=ATOL, rtol=RTOL)
    assert np.isfinite(got[16:]).all()


def test_reordered_pack_split_across_experts_matches_hf(models):
    """Physically permuted tokens, the last 8 positions routed to the gen expert (a copy of und)."""
    cfg, hf, model = models
    ids, perm, tokens, meta, rope = pack(perm_seed=3)
    got = run(model, tokens, meta, rope, num_und=12)[0]
    ref = np.concatenate(hf_logits(hf, ids))
    inv = np.argsort(perm)  # original index -> physical position
    np.testing.assert_allclose(got[inv[:16]], ref, atol=ATOL, rtol=RTOL)
