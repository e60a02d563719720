"""taming-transformers import: the imported tokenizer reproduces taming's own encode -> quantize -> decode."""
from __future__ import annotations

import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model",
                                   reason="taming-transformers-rom1504 not installed (pip install -e .[dev])")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize", reason="taming-transformers-rom1504 not installed")

from common import ConfigError  # noqa: E402
from stage1_tokenizer import VQGAN  # noqa: E402
from stage1_tokenizer.import_taming import import_taming  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DDCONFIG = dict(double_z=False, z_channels=8, resolution=16, in_channels=3, out_ch=3, ch=32, ch_mult=[1, 2],
                num_res_blocks=1, attn_resolutions=[8], dropout=0.0)
N_EMBED, EMBED_DIM = 16, 4
TOL = 1e-4  # taming's own decode paths differ by ~1e-5 in fp32; a wrong GroupNorm eps moves outputs > 4e-4


class TamingVQ(nn.Module):
    """taming.models.vqgan.VQModel without its Lightning base class (which needs an old pytorch-lightning):
    the same submodules under the same names, and VQModel's encode/decode."""

    def __init__(self):
        super().__init__()
        self.encoder = taming_model.Encoder(**DDCONFIG)
        self.decoder = taming_model.Decoder(**DDCONFIG)
        self.quantize = taming_quantize.VectorQuantizer2(N_EMBED, EMBED_DIM, beta=0.25)
        self.quant_conv = nn.Conv2d(DDCONFIG["z_channels"], EMBED_DIM, 1)
        self.post_quant_conv = nn.Conv2d(EMBED_DIM, DDCONFIG["z_channels"], 1)

    def encode(self, x):
        quant, _, (_, _, indices) = self.quantize(self.quant_conv(self.encoder(x)))
        return quant, indices.view(x.shape[0], x.shape[2] // 2, x.shape[3] // 2)

    def decode(self, quant):
        return self.decoder(self.post_quant_conv(quant))

    def decode_code(self, codes):
        B, h, w = codes.shape
        return self.decode(self.quantize.get_codebook_entry(codes.reshape(-1), (B, h, w, EMBED_DIM)))


def _margins(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Per position: (2nd nearest - nearest) distance over the nearest's, for latents (N, D), codebook (K, D)."""
    d = torch.cdist(latents.double(), codebook.double()).sort(dim=1).values
    return (d[:, 1] - d[:, 0]) / d[:, 1]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(taming model, images, checkpoint path, config path), random weights, codebook with clear margins."""
    torch.manual_seed(0)
    ref = TamingVQ().eval()
    with torch.no_grad():  # move every parameter off its init (GroupNorm 1/0 included) so mapping errors show
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = ref.quant_conv(ref.encoder(images)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)  # (B*h*w, D)
        # codes = 16 of the batch's own latents, pushed 20 % further from their mean: every position then has
        # a nearest code clearly ahead of the second; redraw until the smallest relative margin is > 1e-3
        gen = torch.Generator().manual_seed(0)
        for _ in range(100):
            picks = latents[torch.randperm(len(latents), generator=gen)[:N_EMBED]]
            codebook = latents.mean(0) + 1.2 * (picks - latents.mean(0))
            if _margins(latents, codebook).min() > 1e-3:
                break
        else:
            pytest.fail("no codebook with clear margins found")
        ref.quantize.embedding.weight.copy_(codebook)
    root = tmp_path_factory.mktemp("taming")
    ckpt = root / "last.ckpt"
    state = {**ref.state_dict(), "loss.discriminator.main.0.weight": torch.randn(4, 3, 4, 4),
             "loss.perceptual_loss.lin0.model.1.weight": torch.randn(1, 64, 1, 1)}
    torch.save({"state_dict": state, "global_step": 0, "epoch": 0}, ckpt)
    config = root / "model.yaml"
    config.write_text(yaml.safe_dump(_taming_yaml()))
    return ref, images, ckpt, config


def _taming_yaml(target: str = "taming.models.vqgan.VQModel", **dd) -> dict:
    return {"model": {"base_learning_rate": 4.5e-6, "target": target, "params": {
        "embed_dim": EMBED_DIM, "n_embed": N_EMBED, "ddconfig": {**DDCONFIG, **dd},
        "lossconfig": {"target": "taming.modules.losses.vqperceptual.VQLPIPSWithDiscriminator",
                       "params": {"disc_start": 10000, "disc_weight": 0.8}}}}}


def _assert_matches(model: VQGAN, ref: TamingVQ, images: torch.Tensor) -> dict[str, float]:
    with torch.no_grad():
        ref_quant, ref_codes = ref.encode(images)
        codes = model.encode(images)
        assert torch.equal(codes, ref_codes)
        # decode from codes: the path a prior's samples take
        ref_images = ref.decode_code(ref_codes)
        decoded = model.decode(codes)
        decode_diff = (decoded - ref_images.clamp(-1, 1)).abs().max().item()
        unclamped_diff = (model.decode_latents(model.quantize.codes_to_latents(codes)) - ref_images).abs().max().item()
        # full reconstruction through the straight-through z_q
        recon, _ = model(images)
        recon_diff = (recon - ref.decode(ref_quant)).abs().max().item()
    assert decode_diff < TOL and unclamped_diff < TOL and recon_diff < TOL, (decode_diff, unclamped_diff, recon_diff)
    return {"decode": decode_diff, "decode_unclamped": unclamped_diff, "reconstruction": recon_diff}


def test_margins_are_clear(reference):
    ref, images, _, _ = reference
    with torch.no_grad():
        latents = ref.quant_conv(ref.encoder(images)).permute(0, 2, 3, 1).reshape(-1, EMBED_DIM)
    assert _margins(latents, ref.quantize.embedding.weight).min() > 1e-3
    _, codes = ref.encode(images)
    assert codes.unique().numel() > 4  # the test exercises several codes, not one


def test_import_with_config_matches_reference(reference):
    ref, images, ckpt, config = reference
    model = import_taming(ckpt, config)
    assert model.config.quantizer.l2_normalize is False and model.config.quantizer.legacy_beta is True
    assert model.config.attn_resolutions == (8,) and model.config.resolution == 16
    diffs = _assert_matches(model, ref, images)
    print("max abs differences vs taming:", diffs)


def test_import_without_config_infers_the_same_network(reference):
    ref, images, ckpt, config = reference
    inferred, from_yaml = import_taming(ckpt), import_taming(ckpt, config)
    assert inferred.config.ch_mult == (1, 2) and inferred.config.num_res_blocks == 1
    assert [len(level.attn) for level in inferred.encoder.down] == [len(level.attn) for level in from_yaml.encoder.down]
    _assert_matches(inferred, ref, images)


def test_plain_state_dict_checkpoint(reference, tmp_path):
    ref, images, _, config = reference
    torch.save(ref.state_dict(), tmp_path / "model.pt")
    _assert_matches(import_taming(tmp_path / "model.pt", config), ref, images)


def test_cli_writes_a_pretrained_tokenizer(reference, tmp_path):
    ref, images, ckpt, config = reference
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "vqgan", "import", "taming", str(ckpt), "--config", str(config),
                             "--out", str(out)], cwd=REPO, capture_output=True, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and "16 x 4" in result.stdout
    loaded = VQGAN.from_pretrained(out)
    _assert_matches(loaded, ref, images)
    assert loaded.content_hash() == import_taming(ckpt, config).content_hash()


@pytest.mark.parametrize("target,named", [("taming.models.vqgan.GumbelVQ", "GumbelVQ"),
                                          ("taming.models.vqgan.EMAVQ", "EMAVQ"),
                                          ("taming.models.cond_transformer.Net2NetTransformer", "Net2NetTransformer")])
def test_unsupported_targets_are_refused(reference, tmp_path, target, named):
    _, _, ckpt, _ = reference
    config = tmp_path / "gumbel.yaml"
    config.write_text(yaml.safe_dump(_taming_yaml(target)))
    with pytest.raises(ConfigError, match=named) as err:
        import_taming(ckpt, config)
    assert "taming.models.vqgan.VQModel" in str(err.value) and str(config) in str(err.value)


@pytest.mark.parametrize("option,value", [("double_z", True), ("resamp_with_conv", False), ("give_pre_end", True),
                                          ("tanh_out", True), ("attn_type", "linear"), ("use_checkpoint", True)])
def test_inexpressible_ddconfig_options_are_refused(reference, tmp_path, option, value):
    _, _, ckpt, _ = reference
    config = tmp_path / "bad.yaml"
    config.write_text(yaml.safe_dump(_taming_yaml(**{option: value})))
    with pytest.raises(ConfigError, match=option):
        import_taming(ckpt, config)


def test_gumbel_weights_without_config_are_refused(reference, tmp_path):
    ref, _, _, _ = reference
    state = {k: v for k, v in ref.state_dict().items() if not k.startswith("quantize.")}
    state.update({"quantize.proj.weight": torch.randn(N_EMBED, 8, 1, 1), "quantize.embed.weight": torch.randn(N_EMBED, 4)})
    torch.save({"state_dict": state}, tmp_path / "gumbel.ckpt")
    with pytest.raises(ConfigError, match="Gumbel"):
        import_taming(tmp_path / "gumbel.ckpt")


def test_unexpected_and_missing_keys_are_named(reference, tmp_path):
    ref, _, _, config = reference
    state = {**ref.state_dict(), "encoder.extra_norm.weight": torch.ones(3)}
    torch.save({"state_dict": state}, tmp_path / "extra.ckpt")
    with pytest.raises(ConfigError, match="encoder.extra_norm.weight"):
        import_taming(tmp_path / "extra.ckpt", config)
    state = {k: v for k, v in ref.state_dict().items() if k != "decoder.mid.attn_1.q.bias"}
    torch.save({"state_dict": state}, tmp_path / "missing.ckpt")
    with pytest.raises(ConfigError, match="decoder.mid.attn_1.q.bias"):
        import_taming(tmp_path / "missing.ckpt", config)


class Payload:
    """Would run code when unpickled with weights_only=False."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary object",))


def test_arbitrary_pickled_objects_are_refused(reference, tmp_path, capsys):
    ref, _, _, config = reference
    torch.save({"state_dict": ref.state_dict(), "hyper_parameters": Payload()}, tmp_path / "evil.ckpt")
    with pytest.raises(ConfigError, match="weights_only") as err:
        import_taming(tmp_path / "evil.ckpt", config)
    assert "print" in str(err.value)
    assert "unpickled arbitrary object" not in capsys.readouterr().out


def test_lightning_callback_types_are_allowed_as_inert_names(reference, tmp_path, monkeypatch):
    """Lightning checkpoints key their callback states by the callback class: that name alone is allowed."""
    ref, images, _, config = reference
    module = types.ModuleType("pytorch_lightning.callbacks.model_checkpoint")

    class ModelCheckpoint:
        pass
    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    monkeypatch.setitem(sys.modules, module.__name__, module)
    torch.save({"state_dict": ref.state_dict(), "callbacks": {ModelCheckpoint: {"best_model_path": "x"}}},
               tmp_path / "lightning.ckpt")
    monkeypatch.delitem(sys.modules, module.__name__)
    _assert_matches(import_taming(tmp_path / "lightning.ckpt", config), ref, images)
