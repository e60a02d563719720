"""The quantizer family behind one interface: FSQ, LFQ, residual VQ (and plain VQ through the same API)."""
from __future__ import annotations

import math

import pytest
import torch

from stage1_tokenizer import (VQGAN, FiniteScalarQuantizer, LookupFreeQuantizer, QuantizerConfig, ResidualQuantizer,
                              TokenizerLoadError, VQGANConfig, build_quantizer)

QUANTIZERS = {
    "vq": dict(type="vq", codebook_size=64, code_dim=4),
    "fsq": dict(type="fsq", levels=(5, 4, 3)),
    "lfq": dict(type="lfq", codebook_size=64),
    "rvq": dict(type="rvq", codebook_size=32, code_dim=4, depth=3),
    "vqvae2": dict(type="vqvae2", codebook_size=32, code_dim=4),
}


def tiny_tokenizer(quantizer: dict, seed: int = 0) -> VQGAN:
    torch.manual_seed(seed)
    config = VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), z_channels=8,
                         norm_groups=4, quantizer=QuantizerConfig(**quantizer))
    return VQGAN(config).eval()


def test_fsq_bounds_rounding_and_straight_through():
    quantizer = build_quantizer(QuantizerConfig(type="fsq", levels=(5, 4))).train()
    assert isinstance(quantizer, FiniteScalarQuantizer) and quantizer.latent_dim == 2
    assert quantizer.vocab_sizes == [20] and quantizer.code_depth == 1
    z = (torch.randn(3, 2, 4, 4) * 4).requires_grad_()
    out = quantizer(z)
    # each channel takes exactly levels[i] values, inside [-1, 1]
    for channel, levels in enumerate((5, 4)):
        values = out.z_q[:, channel].detach().unique()
        assert len(values) <= levels and values.abs().max() <= 1.0
    grid = torch.cartesian_prod(torch.arange(5), torch.arange(4))               # every code
    codes = torch.stack([grid[:, 0] + 5 * grid[:, 1]]).reshape(1, 4, 5)     # (1, h, w): all 20 codes
    latents = quantizer.codes_to_latents(codes)
    assert len({tuple(v) for v in latents.flatten(2)[0].t().tolist()}) == 20   # 20 distinct points
    # encode and the forward pass agree: the latents of the codes are the quantized values
    torch.testing.assert_close(quantizer.codes_to_latents(quantizer.encode(z.detach())), out.z_q.detach())
    assert out.loss.item() == 0.0                                             # no auxiliary loss
    out.z_q.sum().backward()
    assert z.grad is not None and z.grad.abs().sum() > 0                      # gradients pass straight through


def test_residual_error_falls_with_depth():
    torch.manual_seed(0)
    z = torch.randn(4, 4, 8, 8)
    errors = []
    for depth in (1, 2, 4):
        torch.manual_seed(1)
        quantizer = build_quantizer(QuantizerConfig(type="rvq", codebook_size=16, code_dim=4, depth=depth)).train()
        assert isinstance(quantizer, ResidualQuantizer)
        for _ in range(30):                                                   # EMA codebooks settle
            quantizer(z)
        quantizer.eval()
        codes = quantizer.encode(z)
        assert codes.shape == (4, 8, 8, depth)
        errors.append((quantizer.codes_to_latents(codes) - z).pow(2).mean().item())
    assert errors[0] > errors[1] > errors[2], errors


def test_lfq_entropy_terms_equal_a_direct_computation():
    quantizer = build_quantizer(QuantizerConfig(type="lfq", codebook_size=8, lfq_inv_temperature=3.0))
    assert isinstance(quantizer, LookupFreeQuantizer) and quantizer.latent_dim == 3
    z = torch.randn(2, 3, 2, 2, generator=torch.Generator().manual_seed(0))
    per_sample, batch = quantizer.entropy_terms(z)
    # direct: soft assignment over the 8 corners of {-1, 1}^3, softmax(2 * T * <z, c>)
    corners = torch.tensor([[1.0 if code >> (2 - bit) & 1 else -1.0 for bit in range(3)] for code in range(8)])
    vectors = z.permute(0, 2, 3, 1).reshape(-1, 3)
    probs = (2 * 3.0 * vectors @ corners.t()).softmax(-1)
    entropy = lambda p: -(p * p.clamp_min(1e-5).log()).sum(-1)  # noqa: E731 (the library's clamp)
    torch.testing.assert_close(per_sample, entropy(probs).mean(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(batch, entropy(probs.mean(0)), atol=1e-5, rtol=1e-5)
    # and the codes are the sign bits, most significant first
    codes = quantizer.encode(z)
    bits = (z > 0).long().permute(0, 2, 3, 1)
    assert torch.equal(codes, bits[..., 0] * 4 + bits[..., 1] * 2 + bits[..., 2])


@pytest.mark.parametrize("name", sorted(QUANTIZERS))
def test_every_quantizer_round_trips_through_save_and_load(name, tmp_path):
    model = tiny_tokenizer(QUANTIZERS[name])
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    model.train()
    reconstruction, out = model(images)                                       # one training forward
    (reconstruction.abs().mean() + out.loss).backward()
    model.eval()
    codes = model.encode(images)
    depth, side = model.code_depth, 16 // model.code_factor
    assert codes.shape == ((2, side, side) if depth == 1 else (2, side, side, depth)) and codes.dtype == torch.int64
    limits = torch.tensor(model.vocab_sizes)
    assert (codes >= 0).all() and (codes < (limits if depth > 1 else limits[0])).all()
    model.save_pretrained(tmp_path / name)
    loaded = VQGAN.from_pretrained(tmp_path / name)
    assert torch.equal(loaded.encode(images), codes)                          # bit-identical codes
    torch.testing.assert_close(loaded.decode(codes), model.decode(codes))
    with torch.autocast("cpu", dtype=torch.bfloat16):                        # quantization stays fp32
        assert model.encode(images).shape == codes.shape


def test_decode_checks_the_code_shape_and_range():
    model = tiny_tokenizer(QUANTIZERS["rvq"])
    with pytest.raises(ValueError, match=r"\(B, h, w, 3\)"):
        model.decode(torch.zeros(1, 8, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="vocab_sizes"):
        model.decode(torch.full((1, 8, 8, 3), 32))


def test_content_hash_is_stable_for_tokenizers_saved_before_the_quantizer_family():
    import hashlib
    import json

    from stage1_tokenizer.model import LATER_QUANTIZER_FIELDS
    model = tiny_tokenizer(dict(codebook_size=16, code_dim=4))
    old = model.config_dict()                        # the format-1 config had only vq's options
    for name in LATER_QUANTIZER_FIELDS:
        del old["config"]["quantizer"][name]
    digest = hashlib.sha256(json.dumps(old, sort_keys=True).encode())
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode() + str(tensor.dtype).encode() + str(tuple(tensor.shape)).encode())
        digest.update(tensor.contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    assert model.content_hash() == digest.hexdigest()
    model.config.quantizer.depth = 2                 # a later option that differs from its default counts
    assert model.content_hash() != digest.hexdigest()


def test_checkpoint_of_one_type_loaded_as_another_is_refused(tmp_path):
    import json
    tiny_tokenizer(QUANTIZERS["fsq"]).save_pretrained(tmp_path / "fsq")
    config = json.loads((tmp_path / "fsq" / "config.json").read_text())
    config["config"]["quantizer"]["type"] = "lfq"
    (tmp_path / "fsq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(TokenizerLoadError, match="'fsq' quantizer.*quantizer.type='lfq'"):
        VQGAN.from_pretrained(tmp_path / "fsq")


def test_quantizer_config_errors():
    with pytest.raises(ValueError, match="expected one of vq, rvq, fsq, lfq"):
        QuantizerConfig(type="gumbel")
    with pytest.raises(ValueError, match="power of two"):
        QuantizerConfig(type="lfq", codebook_size=100)
    with pytest.raises(ValueError, match="levels"):
        QuantizerConfig(type="fsq", levels=(8, 1))
    with pytest.raises(ValueError, match="depth"):
        QuantizerConfig(type="rvq", depth=0)
    assert math.prod(QuantizerConfig(type="fsq").levels) == 1000


def test_vqvae2_codes_are_top_then_its_bottom_block():
    model = tiny_tokenizer(QUANTIZERS["vqvae2"])
    assert model.code_factor == 4 and model.code_grid(16) == (4, 4) and model.vocab_sizes == [32] * 5
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(images)                                              # (2, 4, 4, 5)
    top, bottom = model.quantize.unpack(codes)
    assert top.shape == (2, 4, 4) and bottom.shape == (2, 8, 8)
    assert torch.equal(model.quantize.pack(top, bottom), codes)
    assert torch.equal(codes[:, 1, 2, 1:], bottom[:, 2:4, 4:6].reshape(2, 4))  # raster order of the 2x2 block
    # the bottom level is conditioned on the top: changing a top code changes the decoded image there
    changed = codes.clone()
    changed[:, 0, 0, 0] = (changed[:, 0, 0, 0] + 1) % 32
    difference = (model.decode(changed) - model.decode(codes)).abs()
    assert difference[..., :4, :4].sum() > 0
    with pytest.raises(ValueError, match="even"):
        VQGANConfig(resolution=8, ch=16, ch_mult=(1, 2, 2, 2), quantizer=QuantizerConfig(type="vqvae2"))


@pytest.mark.parametrize("name", ["fsq", "lfq", "rvq", "vqvae2"])
def test_quantizer_end_to_end_through_the_console_script(name, tmp_path):
    """train-tokenizer -> encode -> train-prior -> sample, with each quantizer (CI-sized)."""
    import json
    from pathlib import Path

    from vqgan.cli import main

    repo = Path(__file__).resolve().parents[1]
    overrides = {"fsq": ["model.quantizer.type=fsq", "model.quantizer.levels=[4,3,3]"],
                 "lfq": ["model.quantizer.type=lfq", "model.quantizer.codebook_size=32"],
                 "rvq": ["model.quantizer.type=rvq", "model.quantizer.codebook_size=16", "model.quantizer.depth=2",
                         "model.quantizer.code_dim=4"],
                 "vqvae2": ["model.quantizer.type=vqvae2", "model.quantizer.codebook_size=16",
                            "model.quantizer.code_dim=4"]}[name]
    source = "synthetic:shapes?size=16&classes=3"
    assert main(["train-tokenizer", "--config", str(repo / "configs/tiny.yaml"), *overrides,
                 "model.resolution=16", "model.ch=16", "model.ch_mult=[1,2]", "model.z_channels=8",
                 "train.steps=2", "train.batch_size=4", "train.warmup_steps=1", "train.eval_images=8",
                 "train.image_every=1000", "train.checkpoint_every=1000", "train.mixed_precision=no",
                 "loss.disc_start=1000", f"data.source={source}", f"train.out_dir={tmp_path / 'stage1'}"]) == 0
    tokenizer_dir = tmp_path / "stage1" / "tokenizer"
    tokenizer = VQGAN.from_pretrained(tokenizer_dir)
    assert tokenizer.config.quantizer.type == name
    assert main(["encode", "--tokenizer", str(tokenizer_dir), "--data", source, "--out", str(tmp_path / "codes")]) == 0
    manifest = json.loads((tmp_path / "codes" / "manifest.json").read_text())
    depth, side = tokenizer.code_depth, 16 // tokenizer.code_factor
    assert manifest["code_shape"] == ([side, side] if depth == 1 else [side, side, depth])
    assert manifest["vocab_sizes"] == tokenizer.vocab_sizes
    assert main(["train-prior", "--config", str(repo / "configs/tiny.yaml"), "model.dim=32", "model.depth=1",
                 "model.heads=2", "train.batch_size=4", "train.warmup_steps=1", "train.steps=2",
                 "train.sample_every=1000", "train.checkpoint_every=1000", "train.mixed_precision=no",
                 f"train.out_dir={tmp_path / 'stage2'}", f"data.codes={tmp_path / 'codes'}",
                 f"data.tokenizer={tokenizer_dir}"]) == 0
    prior_config = json.loads((tmp_path / "stage2" / "prior" / "config.json").read_text())["config"]
    assert prior_config["code_shape"] == manifest["code_shape"]
    from stage2_prior import GPTPrior
    assert GPTPrior.from_pretrained(tmp_path / "stage2" / "prior").seq_len == side * side * depth  # h*w*D
    out = tmp_path / "samples"
    assert main(["sample", "--prior", str(tmp_path / "stage2" / "prior"), "--tokenizer", str(tokenizer_dir),
                 "--classes", "0,1", "--n", "2", "--cfg", "2.0", "--out", str(out)]) == 0
    assert len(list(out.glob("0000*.png"))) == 4 and (out / "grid.png").is_file()
    from PIL import Image
    Image.new("RGB", (16, 16), (200, 40, 40)).save(tmp_path / "in.png")
    assert main(["complete", "--prior", str(tmp_path / "stage2" / "prior"), "--tokenizer", str(tokenizer_dir),
                 "--images", str(tmp_path / "in.png"), "--box", "0,8,16,16", "--samples", "2", "--label", "1",
                 "--out", str(tmp_path / "completed")]) == 0
    record = json.loads((tmp_path / "completed" / "completion.json").read_text())
    assert record["kept_codes_unchanged"] and record["kept_positions"] == side * side // 2


def test_vqvae_preset_trains_without_gan_or_perceptual_terms(tmp_path):
    import json
    from pathlib import Path

    from vqgan.cli import main

    repo = Path(__file__).resolve().parents[1]
    assert main(["train-tokenizer", "--config", str(repo / "configs/tiny-vqvae.yaml"), "model.resolution=16",
                 "model.ch=16", "model.ch_mult=[1,2]", "model.z_channels=8", "train.steps=3", "train.batch_size=4",
                 "train.warmup_steps=1", "train.eval_images=8", "train.image_every=1000", "train.checkpoint_every=1000",
                 "train.mixed_precision=no", "loss.disc_start=0", "data.source=synthetic:shapes?size=16",
                 f"train.out_dir={tmp_path}"]) == 0
    logs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [entry for entry in logs if "loss/total" in entry]
    assert steps and all("loss/l2" in entry for entry in steps)
    assert not any(key.startswith(("disc/", "loss/gan", "loss/disc", "loss/perceptual")) for e in steps for key in e)
