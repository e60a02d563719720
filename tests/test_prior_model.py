"""Stage-2 GPT prior and its sampler: shapes, learning, cached == uncached sampling, editing, save/load."""
from __future__ import annotations

import json

import pytest
import torch

from stage2_prior import GPTPrior, PriorConfig, PriorLoadError, generate
from stage2_prior.kv_cache import StaticKVDecoder
from stage2_prior.packed_linear import PackedLinear
from stage2_prior.sample import _DECODERS, _MAX_DECODERS


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_prior(seed: int = 0, **overrides) -> GPTPrior:
    kwargs = dict(dim=32, depth=2, heads=2, code_shape=(4, 4), vocab_sizes=(16,), num_classes=3)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return GPTPrior(PriorConfig(**kwargs)).eval()


def random_codes(prior: GPTPrior, batch: int, seed: int = 0) -> torch.Tensor:
    """Valid codes (B, *code_shape) for every level of the prior."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(prior.config.level_sizes)                       # (D,)
    u = torch.rand(batch, *prior.code_shape[:2], len(sizes), generator=g)
    return (u * sizes).long().reshape(batch, *prior.code_shape)


# ---- model ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_forward_shapes_and_loss(positions):
    prior = tiny_prior(positions=positions)
    codes = random_codes(prior, 3)
    logits, loss = prior(codes, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 16, 16) and loss.ndim == 0
    assert abs(loss.item() - torch.log(torch.tensor(16.0)).item()) < 0.5  # near uniform at init
    # (B, L) codes are accepted too and give the same result; no labels = unconditional
    logits_flat, _ = prior(codes.reshape(3, 16), torch.tensor([0, 1, 2]))
    assert torch.equal(logits, logits_flat)
    assert prior(codes)[0].shape == (3, 16, 16)
    assert prior.seq_len == 16 and prior.vocab_size == 16
    assert prior.transformer.token_emb.emb.num_embeddings == 16 + 3 + 1
    assert prior.num_parameters() > prior.estimate_flops_per_token() / 6 - 12 * 2 * 32 * 16 / 6 - 1
    assert 0 < prior.estimate_mfu(1e4, 1e12) < 1


def test_loss_falls_when_overfitting_one_batch():
    prior = tiny_prior().train()
    codes, labels = random_codes(prior, 8), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    opt = torch.optim.AdamW(prior.parameters(), lr=3e-3)
    losses = []
    for _ in range(50):
        _, loss = prior(codes, labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::10]


def test_causal_logits_do_not_see_the_future():
    prior = tiny_prior()
    codes = random_codes(prior, 1)
    changed = codes.clone().reshape(1, 16)
    changed[0, 10] = (changed[0, 10] + 1) % 16
    a, _ = prior(codes)
    b, _ = prior(changed)
    assert torch.allclose(a[:, :11], b[:, :11], atol=1e-6)   # logits up to position 10 predict t_0..t_10
    assert not torch.allclose(a[:, 11:], b[:, 11:])


def test_label_dropout_drops_in_training_only():
    prior = tiny_prior(class_dropout=0.3)
    seen = []
    prior.transformer.register_forward_pre_hook(lambda module, args: seen.append(args[0][:, 0].clone()))
    codes, labels = random_codes(prior, 2000), torch.full((2000,), 1)
    torch.manual_seed(0)
    prior.train()(codes, labels)
    null_fraction = (seen[-1] == prior.config.null_token).float().mean().item()
    assert abs(null_fraction - 0.3) < 0.05
    assert set(seen[-1].unique().tolist()) == {16 + 1, prior.config.null_token}
    prior.eval()(codes, labels)
    assert (seen[-1] == 16 + 1).all()


def test_multi_level_codes():
    prior = tiny_prior(code_shape=(4, 4, 2), vocab_sizes=(16, 8))
    assert prior.seq_len == 32 and prior.vocab_size == 24 and prior.config.code_depth == 2
    codes = random_codes(prior, 2)
    tokens = prior.flatten_codes(codes)
    assert tokens.shape == (2, 32)
    assert tokens[:, 0::2].max() < 16 and tokens[:, 1::2].min() >= 16     # level 1 offset by 16
    assert torch.equal(prior.unflatten_tokens(tokens), codes)
    logits, loss = prior(codes)
    assert logits.shape == (2, 32, 24) and torch.isfinite(loss)
    assert torch.isinf(logits[:, 0::2, 16:]).all() and torch.isinf(logits[:, 1::2, :16]).all()
    samples = generate(prior, 6, seed=0)
    assert samples.shape == (6, 4, 4, 2)
    assert samples[..., 0].min() >= 0 and samples[..., 0].max() < 16
    assert samples[..., 1].min() >= 0 and samples[..., 1].max() < 8
    assert samples[..., 0].max() >= 8          # level 0 really uses its larger vocabulary
    assert torch.equal(samples, generate(prior, 6, seed=0, use_cache=False))
    # one shared vocabulary for every level: no offsets
    shared = tiny_prior(code_shape=(4, 4, 2), vocab_sizes=(16,))
    small = codes.clamp(max=7)
    assert shared.vocab_size == 16 and torch.equal(shared.flatten_codes(small), small.reshape(2, 32))


# ---- sampling ------------------------------------------------------------------------------------
SAMPLING = [dict(temperature=0.0), dict(temperature=1.0), dict(temperature=1.0, top_k=5, top_p=0.8),
            dict(temperature=0.7, top_p=0.5)]


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_static_kv_cache_logits_match_full_forward(positions):
    prior = tiny_prior(positions=positions, vocab_sizes=(16, 8), code_shape=(2, 4, 2))  # two code levels
    for norm in prior.modules():  # non-trivial norm gains, so a skipped or misplaced norm shows
        if hasattr(norm, "gamma"):
            torch.nn.init.normal_(norm.gamma, 0.0, 0.3)
    inputs = torch.cat([torch.tensor([[24], [27]]), prior.flatten_codes(random_codes(prior, 2))[:, :-1]], dim=1)
    full = prior.forward_tokens(inputs)                                      # (2, 16, 24)
    decoder = StaticKVDecoder(prior, batch_size=2)
    for _ in range(2):                                                       # reset() reuses the buffers
        decoder.reset()
        last = [decoder.step(inputs[:, :5])]                                 # prefill
        last += [decoder.step(inputs[:, a:b]) for a, b in [(5, 6), (6, 7), (7, 10), (10, 16)]]
        ends = [5, 6, 7, 10, 16]
        torch.testing.assert_close(torch.stack(last, 1), full[:, [e - 1 for e in ends]], atol=1e-5, rtol=1e-5)
    bf16 = StaticKVDecoder(prior, batch_size=2, weights_dtype=torch.bfloat16)
    assert bf16.cache.dtype == torch.bfloat16
    torch.testing.assert_close(bf16.step(inputs), full[:, -1], atol=0.05, rtol=0.05)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_packed_linear_matches_f_linear(dtype, activation):
    g = torch.Generator().manual_seed(0)
    weight, bias = torch.randn(24, 16, generator=g).to(dtype), torch.randn(24, generator=g).to(dtype)
    layer = PackedLinear(weight, bias, activation, rows_hint=4)
    for rows in ((4, 1), (2, 3)):                                # the packed row count, and a prefill
        x = torch.randn(*rows, 16, generator=g).to(dtype)
        expected = torch.nn.functional.linear(x, weight, bias)
        expected = torch.nn.functional.gelu(expected) if activation == "gelu" else expected
        tolerance = 1e-5 if dtype == torch.float32 else 0.05
        torch.testing.assert_close(layer(x), expected, atol=tolerance, rtol=tolerance)
    assert not PackedLinear(weight, bias, activation, pack=False).is_packed
    with pytest.raises(ValueError, match="activation"):
        PackedLinear(weight, activation="relu")


def test_packed_and_plain_decoders_agree():
    prior = tiny_prior()
    inputs = torch.cat([torch.tensor([[1], [2]]), prior.flatten_codes(random_codes(prior, 2))[:, :-1]], dim=1)
    packed, plain = StaticKVDecoder(prior, 2), StaticKVDecoder(prior, 2, pack_weights=False)
    torch.testing.assert_close(packed.step(inputs[:, :3]), plain.step(inputs[:, :3]), atol=1e-5, rtol=1e-5)
    for t in range(3, 16):
        torch.testing.assert_close(packed.step(inputs[:, t:t + 1]), plain.step(inputs[:, t:t + 1]), atol=1e-5, rtol=1e-5)


def test_decoder_is_reused_until_the_weights_change():
    prior = tiny_prior()
    labels = torch.tensor([0, 1])
    first = generate(prior, labels=labels, seed=3)
    decoder = _DECODERS[prior][(2, None)][1]
    assert torch.equal(generate(prior, labels=labels, seed=3), first)  # a reused decoder starts clean
    assert _DECODERS[prior][(2, None)][1] is decoder
    generate(prior, labels=torch.tensor([0, 1, 2]), seed=3)             # another batch size: its own decoder
    assert _DECODERS[prior][(3, None)][1] is not decoder and _DECODERS[prior][(2, None)][1] is decoder
    for batch in (4, 5, 6):                                             # at most _MAX_DECODERS shapes kept
        generate(prior, n=batch, seed=0)
    assert len(_DECODERS[prior]) == _MAX_DECODERS and (2, None) not in _DECODERS[prior]
    with torch.no_grad():
        prior.transformer.to_logits.weight.mul_(-1.0)                    # an in-place update: stale copies
    flipped = generate(prior, labels=labels, temperature=0.0)
    assert torch.equal(flipped, generate(prior, labels=labels, temperature=0.0, use_cache=False))
    assert list(_DECODERS[prior]) == [(2, None)]                        # the stale ones were dropped


def test_static_kv_cache_errors():
    prior = tiny_prior()
    decoder = StaticKVDecoder(prior, batch_size=2)
    with pytest.raises(ValueError, match="batch size 2"):
        decoder.step(torch.zeros(3, 1, dtype=torch.long))
    decoder.step(torch.zeros(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="maximum is 16"):
        decoder.step(torch.zeros(2, 1, dtype=torch.long))
    prior.transformer.attn_layers.layers[0][2] = torch.nn.Identity()  # a layout the decoder does not reproduce
    with pytest.raises(NotImplementedError, match="layer 0: residual"):
        StaticKVDecoder(prior, batch_size=2)


@pytest.mark.parametrize("dtype,positions,cfg_scale", [(torch.float32, "rotary", 1.0), (torch.float32, "rotary", 3.0),
                                                       (torch.float32, "learned", 3.0), (torch.float64, "rotary", 3.0)],
                         ids=["fp32-rotary", "fp32-rotary-cfg", "fp32-learned-cfg", "fp64-rotary-cfg"])
def test_cached_equals_uncached(dtype, positions, cfg_scale):
    prior = tiny_prior(positions=positions).to(dtype)
    labels = torch.tensor([0, 1, 2, 1])
    for options in SAMPLING:
        cached = generate(prior, labels=labels, cfg_scale=cfg_scale, seed=7, **options)
        uncached = generate(prior, labels=labels, cfg_scale=cfg_scale, seed=7, use_cache=False, **options)
        assert cached.shape == (4, 4, 4) and cached.dtype == torch.int64
        assert torch.equal(cached, uncached), options


def test_unconditional_sampling_and_seeds():
    prior = tiny_prior(num_classes=0)
    a = generate(prior, 4, seed=1)
    assert torch.equal(a, generate(prior, 4, seed=1))
    assert torch.equal(a, generate(prior, 4, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(a, generate(prior, 4, seed=2))
    assert torch.equal(a, generate(prior, 4, seed=1, use_cache=False))
    assert a.min() >= 0 and a.max() < 16
    assert torch.equal(generate(prior, 2, temperature=0), generate(prior, 2, temperature=0, seed=5))  # greedy


def test_guidance_changes_samples_and_keeps_pairs_together():
    prior = tiny_prior()
    labels = torch.tensor([2, 2, 2])
    plain = generate(prior, labels=labels, seed=3)
    guided = generate(prior, labels=labels, cfg_scale=4.0, seed=3)
    assert guided.shape == plain.shape and not torch.equal(plain, guided)
    # cfg_scale 1 and no labels on a conditional prior: plain sampling, one batch
    assert torch.equal(generate(prior, 3, seed=3, cfg_scale=2.0), generate(prior, 3, seed=3))


def test_top_k_one_is_greedy():
    prior = tiny_prior()
    labels = torch.tensor([0, 1])
    assert torch.equal(generate(prior, labels=labels, top_k=1, seed=0), generate(prior, labels=labels, temperature=0))


def test_keep_mask_completion():
    prior = tiny_prior()
    keep_codes = random_codes(prior, 3, seed=5)
    keep_mask = torch.zeros(4, 4, dtype=torch.bool)
    keep_mask[:2] = True          # top half given: all tokens before the first free position
    keep_mask[3, 1] = True        # and one position after free ones
    labels = torch.tensor([0, 1, 2])
    out = generate(prior, labels=labels, keep_codes=keep_codes, keep_mask=keep_mask, seed=0)
    assert torch.equal(out[:, keep_mask], keep_codes[:, keep_mask])
    assert not torch.equal(out, keep_codes)
    assert torch.equal(out, generate(prior, labels=labels, keep_codes=keep_codes, keep_mask=keep_mask,
                                     seed=0, use_cache=False))
    # the free part depends on the kept prefix
    other = generate(prior, labels=labels, keep_codes=(keep_codes + 1) % 16, keep_mask=keep_mask, seed=0)
    assert not torch.equal(out[:, ~keep_mask], other[:, ~keep_mask])
    # per-sample (B, L) masks; a row may be kept whole while others are sampled
    rows = torch.zeros(3, 16, dtype=torch.bool)
    rows[0] = True
    rows[1, :5] = True
    out = generate(prior, labels=labels, keep_codes=keep_codes, keep_mask=rows, seed=0, cfg_scale=2.0)
    flat = keep_codes.reshape(3, 16)
    assert torch.equal(out.reshape(3, 16)[rows], flat[rows])
    assert torch.equal(out, generate(prior, labels=labels, keep_codes=keep_codes, keep_mask=rows, seed=0,
                                     cfg_scale=2.0, use_cache=False))
    # only kept positions need valid codes
    junk = keep_codes.clone()
    junk[:, ~keep_mask] = -1
    assert generate(prior, labels=labels, keep_codes=junk, keep_mask=keep_mask, seed=0).min() >= 0


def test_sampling_errors():
    prior = tiny_prior()
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        generate(prior, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match="keeps every position"):
        generate(prior, 2, keep_codes=torch.zeros(2, 4, 4, dtype=torch.long),
                 keep_mask=torch.ones(16, dtype=torch.bool))
    with pytest.raises(ValueError, match="out of range"):
        generate(prior, 1, keep_codes=torch.full((1, 4, 4), 16), keep_mask=torch.ones(4, 4, dtype=torch.bool).tril())
    for bad in [dict(temperature=-1.0), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)]:
        with pytest.raises(ValueError):
            generate(prior, 1, **bad)
    with pytest.raises(ValueError, match="n=3"):
        generate(prior, 3, labels=torch.tensor([0, 1]))
    uncond = tiny_prior(num_classes=0)
    with pytest.raises(ValueError, match="classifier-free guidance needs a class-conditional prior"):
        generate(uncond, 2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="unconditional"):
        generate(uncond, labels=torch.tensor([0]))


def test_model_errors():
    prior = tiny_prior()
    codes = random_codes(prior, 2)
    with pytest.raises(ValueError, match=r"\[0, 3\)"):
        prior(codes, torch.tensor([0, -1]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior(num_classes=0)(codes, torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="out of range"):
        prior(codes + 16)
    with pytest.raises(ValueError, match="shape"):
        prior(codes[:, :2])
    with pytest.raises(ValueError, match="prior_type"):
        PriorConfig(prior_type="diffusion")
    with pytest.raises(ValueError, match="prior_type='masked'.*build_prior"):
        GPTPrior(PriorConfig(prior_type="masked"))
    with pytest.raises(ValueError, match="mask_schedule"):
        PriorConfig(mask_schedule="exp")
    with pytest.raises(ValueError, match="vocab_sizes"):
        PriorConfig(code_shape=(4, 4, 2), vocab_sizes=(16, 8, 4))
    with pytest.raises(ValueError, match="positions"):
        PriorConfig(positions="alibi")


# ---- save / load ---------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    prior = tiny_prior(code_shape=(4, 4, 2), vocab_sizes=(16, 8))
    prior.save_pretrained(tmp_path / "prior", tokenizer_hash="abc123", tokenizer_config={"ch": 16})
    meta = json.loads((tmp_path / "prior" / "config.json").read_text())
    assert meta["model_type"] == "vqgan-prior" and meta["format_version"] == 1 and meta["tokenizer_hash"] == "abc123"
    loaded = GPTPrior.from_pretrained(tmp_path / "prior", tokenizer_hash="abc123")
    assert loaded.tokenizer_hash == "abc123" and loaded.tokenizer_config == {"ch": 16}
    assert loaded.prior_type == "ar" and loaded.config == prior.config and not loaded.training
    codes = random_codes(prior, 2)
    assert torch.equal(prior(codes)[0], loaded(codes)[0])
    assert torch.equal(generate(prior, 2, seed=0), generate(loaded, 2, seed=0))
    assert tiny_prior().tokenizer_hash == "" and tiny_prior().tokenizer_config is None


def test_from_pretrained_errors(tmp_path):
    prior = tiny_prior()
    path = prior.save_pretrained(tmp_path / "prior", tokenizer_hash="aaaa")
    with pytest.raises(PriorLoadError, match="trained on codes of tokenizer aaaa, you passed bbbb"):
        GPTPrior.from_pretrained(path, tokenizer_hash="bbbb")
    with pytest.raises(PriorLoadError, match="does not exist"):
        GPTPrior.from_pretrained(tmp_path / "nowhere")
    config_path = path / "config.json"
    good = config_path.read_text()
    config_path.write_text("{not json")
    with pytest.raises(PriorLoadError, match="config.json is not valid JSON"):
        GPTPrior.from_pretrained(path)
    meta = json.loads(good)
    meta["config"]["dimension"] = 64
    config_path.write_text(json.dumps(meta))
    with pytest.raises(PriorLoadError, match="dimension"):
        GPTPrior.from_pretrained(path)
    meta = json.loads(good)
    meta["config"]["dim"] = 64
    config_path.write_text(json.dumps(meta))
    with pytest.raises(PriorLoadError, match="model.safetensors does not match.*wrong shapes"):
        GPTPrior.from_pretrained(path)
    meta = json.loads(good)
    meta["config"]["prior_type"] = "masked"
    config_path.write_text(json.dumps(meta))
    with pytest.raises(PriorLoadError, match="prior_type"):
        GPTPrior.from_pretrained(path)
    config_path.write_text(good)
    (path / "model.safetensors").unlink()
    with pytest.raises(PriorLoadError, match="model.safetensors is missing"):
        GPTPrior.from_pretrained(path)
    config_path.unlink()
    with pytest.raises(PriorLoadError, match="config.json is missing"):
        GPTPrior.from_pretrained(path)
    with pytest.raises(ValueError, match="tokenizer_hash"):
        prior.save_pretrained(tmp_path / "other", tokenizer_hash="")
