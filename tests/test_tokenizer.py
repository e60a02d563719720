"""Stage-1 model and quantizer: shapes, gradients, codebook behaviour, save/load."""
from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from stage1_tokenizer import VQGAN, QuantizerConfig, TokenizerLoadError, VectorQuantizer, VQGANConfig
from common.checkpoint import update_ema


def tiny_config(ch_mult=(1, 2, 2), resolution=32, **quant) -> VQGANConfig:
    q = dict(codebook_size=32, code_dim=4)
    q.update(quant)
    return VQGANConfig(resolution=resolution, ch=16, ch_mult=ch_mult, num_res_blocks=1, attn_resolutions=(8,),
                       z_channels=16, norm_groups=8, quantizer=QuantizerConfig(**q))


@pytest.mark.parametrize("ch_mult,factor", [((1, 2, 2), 4), ((1, 2, 2, 4), 8), ((1, 1, 2, 2, 4), 16)])
def test_shapes_for_f4_f8_f16(ch_mult, factor):
    torch.manual_seed(0)
    model = VQGAN(tiny_config(ch_mult, resolution=64))
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 64 // factor, 64 // factor) and codes.dtype == torch.int64
    assert model.code_grid(64) == (64 // factor, 64 // factor)
    decoded = model.decode(codes)
    assert decoded.shape == images.shape and decoded.min() >= -1 and decoded.max() <= 1
    recon, quant = model(images)
    assert recon.shape == images.shape
    assert torch.equal(quant.codes, codes)
    # non-square inputs work: the network is fully convolutional
    assert model.encode(torch.zeros(1, 3, 64, 128)).shape == (1, 64 // factor, 128 // factor)


def test_straight_through_gradients_reach_encoder():
    torch.manual_seed(0)
    model = VQGAN(tiny_config())
    recon, quant = model(torch.rand(2, 3, 32, 32) * 2 - 1)
    F.l1_loss(recon, torch.zeros_like(recon)).backward()  # reconstruction loss only, no quantizer loss
    assert model.encoder.conv_in.weight.grad is not None
    assert model.encoder.conv_in.weight.grad.abs().sum() > 0
    assert model.quant_conv.weight.grad.abs().sum() > 0


def test_codebook_loss_falls_on_fixed_batch():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4, l2_normalize=False))
    z = torch.randn(4, 4, 6, 6)
    opt = torch.optim.Adam(quantizer.parameters(), lr=0.05)
    losses = []
    for _ in range(60):
        out = quantizer(z)
        losses.append(out.stats["quantizer/codebook_loss"].item())
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    assert losses[-1] < 0.5 * losses[0]


def test_straight_through_output_equals_codebook_vectors():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=16, code_dim=4, l2_normalize=True))
    out = quantizer(torch.randn(2, 4, 3, 3))
    assert torch.allclose(out.z_q, quantizer.codes_to_latents(out.codes), atol=1e-6)
    assert torch.allclose(quantizer.codebook.norm(dim=-1), torch.ones(16), atol=1e-5)
    assert torch.equal(quantizer.encode(out.z_q.detach()), out.codes)


def test_legacy_beta_moves_beta_to_codebook_term():
    torch.manual_seed(0)
    z = torch.randn(2, 4, 3, 3)
    q = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4, l2_normalize=False, beta=0.25))
    legacy = copy.deepcopy(q)
    legacy.config = QuantizerConfig(codebook_size=8, code_dim=4, l2_normalize=False, beta=0.25, legacy_beta=True)
    a, b = q(z), legacy(z)
    cb, cm = a.stats["quantizer/codebook_loss"], a.stats["quantizer/commitment_loss"]
    assert torch.allclose(a.loss, cb + 0.25 * cm)
    assert torch.allclose(b.loss, 0.25 * cb + cm)


def test_dead_codes_are_revived():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=32, code_dim=4, l2_normalize=False,
                                                dead_code_patience=2))
    with torch.no_grad():
        quantizer.embedding.weight.copy_(torch.randn(32, 4) * 100)  # far from the data: all but a few dead
        quantizer.embedding.weight[0] = 0.0
    z = torch.randn(8, 4, 4, 4)
    quantizer.train()
    before = quantizer(z).stats["quantizer/batch_usage"].item()
    for _ in range(3):
        quantizer(z)
    after = quantizer(z).stats["quantizer/batch_usage"].item()
    assert before <= 2 / 32
    assert after > 0.5
    # revived codes were taken from encoder outputs
    z_flat = z.permute(0, 2, 3, 1).reshape(-1, 4)
    d = torch.cdist(quantizer.embedding.weight.detach(), z_flat).min(dim=1).values
    assert (d < 1e-5).float().mean() > 0.5


def test_dead_code_revival_off_leaves_codebook():
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=8, code_dim=4, dead_code_patience=0))
    before = quantizer.embedding.weight.detach().clone()
    quantizer.train()
    for _ in range(3):
        quantizer(torch.randn(2, 4, 3, 3))
    assert torch.equal(before, quantizer.embedding.weight.detach())


def test_ema_codebook_moves_toward_assigned_vectors():
    torch.manual_seed(0)
    quantizer = VectorQuantizer(QuantizerConfig(codebook_size=4, code_dim=2, l2_normalize=False,
                                                use_ema=True, ema_decay=0.5))
    assert not quantizer.embedding.weight.requires_grad
    z = torch.tensor([3.0, -2.0]).view(1, 2, 1, 1).repeat(1, 1, 2, 2)
    quantizer.train()
    code = quantizer(z).codes[0, 0, 0].item()
    for _ in range(20):
        quantizer(z)
    assert torch.allclose(quantizer.embedding.weight[code], torch.tensor([3.0, -2.0]), atol=1e-3)


def test_ema_weights_update():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 3)
    ema = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    expected = [0.9 * e + 0.1 * p for e, p in zip(ema.parameters(), model.parameters())]
    update_ema(ema, model, decay=0.9)
    for e, x in zip(ema.parameters(), expected):
        assert torch.allclose(e, x)


def test_entropy_penalty_matches_direct_computation():
    torch.manual_seed(0)
    cfg = QuantizerConfig(codebook_size=5, code_dim=3, l2_normalize=False, entropy_weight=1.0, entropy_temperature=0.5)
    quantizer = VectorQuantizer(cfg)
    z = torch.randn(1, 3, 2, 2)
    out = quantizer(z)
    flat = z.permute(0, 2, 3, 1).reshape(-1, 3)
    d = torch.cdist(flat, quantizer.embedding.weight.detach()).pow(2)
    p = torch.softmax(-d / 0.5, dim=-1)
    sample_h = -(p * p.log()).sum(-1).mean()
    avg = p.mean(0)
    expected = sample_h + (avg * avg.log()).sum()
    assert torch.allclose(out.stats["quantizer/entropy_loss"], expected, atol=1e-5)


def test_save_load_is_bit_identical(tmp_path):
    torch.manual_seed(0)
    model = VQGAN(tiny_config(dead_code_patience=3)).eval()
    images = torch.rand(3, 3, 32, 32) * 2 - 1
    model.save_pretrained(tmp_path / "tok")
    loaded = VQGAN.from_pretrained(tmp_path / "tok")
    assert torch.equal(model.encode(images), loaded.encode(images))
    assert torch.equal(model.decode(model.encode(images)), loaded.decode(loaded.encode(images)))
    assert model.content_hash() == loaded.content_hash()
    assert loaded.config == model.config


def test_load_errors_name_the_file(tmp_path):
    model = VQGAN(tiny_config())
    good = model.save_pretrained(tmp_path / "tok")

    with pytest.raises(TokenizerLoadError, match="does not exist"):
        VQGAN.from_pretrained(tmp_path / "nowhere")

    (tmp_path / "noconfig").mkdir()
    with pytest.raises(TokenizerLoadError, match="config.json is missing"):
        VQGAN.from_pretrained(tmp_path / "noconfig")

    bad = tmp_path / "badjson"
    bad.mkdir()
    (bad / "config.json").write_text("{not json")
    with pytest.raises(TokenizerLoadError, match="badjson/config.json is not valid JSON"):
        VQGAN.from_pretrained(bad)

    meta = json.loads((good / "config.json").read_text())
    meta["config"]["chanels"] = 3
    unknown = tmp_path / "unknown"
    unknown.mkdir()
    (unknown / "config.json").write_text(json.dumps(meta))
    with pytest.raises(TokenizerLoadError, match=r"unknown key\(s\) \['chanels'\]"):
        VQGAN.from_pretrained(unknown)

    # weights of the wrong shape: a config with a bigger codebook than the weights
    meta = json.loads((good / "config.json").read_text())
    meta["config"]["quantizer"]["codebook_size"] = 64
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    (wrong / "config.json").write_text(json.dumps(meta))
    (wrong / "model.safetensors").write_bytes((good / "model.safetensors").read_bytes())
    with pytest.raises(TokenizerLoadError, match=r"model.safetensors does not match .*quantize.embedding.weight"):
        VQGAN.from_pretrained(wrong)

    missing_weights = tmp_path / "noweights"
    missing_weights.mkdir()
    (missing_weights / "config.json").write_text((good / "config.json").read_text())
    with pytest.raises(TokenizerLoadError, match="model.safetensors is missing"):
        VQGAN.from_pretrained(missing_weights)


def test_decode_rejects_bad_codes():
    model = VQGAN(tiny_config())
    with pytest.raises(ValueError, match="codes must lie in"):
        model.decode(torch.full((1, 8, 8), 32))
    with pytest.raises(ValueError, match=r"shape \(B, h, w\)"):
        model.decode(torch.zeros(8, 8, dtype=torch.long))


def test_config_validation():
    with pytest.raises(ValueError, match="not divisible"):
        VQGANConfig(resolution=30, ch_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="expected one of vq, rvq"):
        QuantizerConfig(type="gumbel")


def test_parameter_count_of_taming_f16_shape():
    cfg = VQGANConfig(quantizer=QuantizerConfig(codebook_size=1024, code_dim=256, l2_normalize=False))
    assert abs(VQGAN(cfg).num_parameters() / 1e6 - 72.1) < 0.1  # taming's ImageNet f16 config
