"""LlamaGen VQ tokenizer import (`vqgan import llamagen`).

Part (a) always runs: a synthetic checkpoint in LlamaGen's layout (key names and shapes of
`tokenizer/tokenizer_image/vq_model.py`, random tensors) imports, lands in the right modules,
round-trips through save_pretrained/from_pretrained, and everything inexpressible is refused by name.

Part (b), `test_matches_llamagen_reference`, checks numerical equivalence against LlamaGen's own code.
It runs only when LLAMAGEN_SRC points to a checkout of https://github.com/FoundationVision/LlamaGen
(the file used is tokenizer/tokenizer_image/vq_model.py; checked against commit
3786e6ad479f600b2c45ad302c6e9d717df0fdae, which needs `huggingface_hub` for its PyTorchModelHubMixin):

    LLAMAGEN_SRC=/path/to/LlamaGen python -m pytest -q tests/test_import_llamagen.py
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import ConfigError
from stage1_tokenizer import VQGAN
from stage1_tokenizer.import_llamagen import import_llamagen

REPO = Path(__file__).resolve().parents[1]
CH, CH_MULT, NUM_RES, Z, N_E, E_DIM = 32, (1, 2), 2, 8, 16, 4
TOL = 1e-4


# ---- a LlamaGen-layout state dict, written from the key names of LlamaGen's vq_model.py -------------
def _resnet(prefix: str, cin: int, cout: int, out: dict) -> None:
    out.update({f"{prefix}.norm1.weight": (cin,), f"{prefix}.norm1.bias": (cin,),
                f"{prefix}.conv1.weight": (cout, cin, 3, 3), f"{prefix}.conv1.bias": (cout,),
                f"{prefix}.norm2.weight": (cout,), f"{prefix}.norm2.bias": (cout,),
                f"{prefix}.conv2.weight": (cout, cout, 3, 3), f"{prefix}.conv2.bias": (cout,)})
    if cin != cout:
        out.update({f"{prefix}.nin_shortcut.weight": (cout, cin, 1, 1), f"{prefix}.nin_shortcut.bias": (cout,)})


def _attn(prefix: str, c: int, out: dict) -> None:
    out.update({f"{prefix}.norm.weight": (c,), f"{prefix}.norm.bias": (c,)})
    for name in ("q", "k", "v", "proj_out"):
        out.update({f"{prefix}.{name}.weight": (c, c, 1, 1), f"{prefix}.{name}.bias": (c,)})


def llamagen_shapes(ch=CH, ch_mult=CH_MULT, num_res=NUM_RES, z=Z, n_e=N_E, e_dim=E_DIM) -> dict[str, tuple]:
    s: dict[str, tuple] = {"encoder.conv_in.weight": (ch, 3, 3, 3), "encoder.conv_in.bias": (ch,)}
    L = len(ch_mult)
    block_in = ch
    for i, m in enumerate(ch_mult):                       # encoder: conv_blocks[i] at resolution / 2**i
        block_in = ch * ((1,) + tuple(ch_mult))[i]
        for j in range(num_res):
            _resnet(f"encoder.conv_blocks.{i}.res.{j}", block_in, ch * m, s)
            block_in = ch * m
            if i == L - 1:
                _attn(f"encoder.conv_blocks.{i}.attn.{j}", block_in, s)
        if i != L - 1:
            s.update({f"encoder.conv_blocks.{i}.downsample.conv.weight": (block_in, block_in, 3, 3),
                      f"encoder.conv_blocks.{i}.downsample.conv.bias": (block_in,)})
    for part in ("encoder", "decoder"):
        c = ch * ch_mult[-1]
        _resnet(f"{part}.mid.0", c, c, s)
        _attn(f"{part}.mid.1", c, s)
        _resnet(f"{part}.mid.2", c, c, s)
    s.update({"encoder.norm_out.weight": (block_in,), "encoder.norm_out.bias": (block_in,),
              "encoder.conv_out.weight": (z, block_in, 3, 3), "encoder.conv_out.bias": (z,)})
    block_in = ch * ch_mult[-1]
    s.update({"decoder.conv_in.weight": (block_in, z, 3, 3), "decoder.conv_in.bias": (block_in,)})
    for k, i in enumerate(reversed(range(L))):            # decoder: conv_blocks[0] is the lowest resolution
        for j in range(num_res + 1):
            _resnet(f"decoder.conv_blocks.{k}.res.{j}", block_in, ch * ch_mult[i], s)
            block_in = ch * ch_mult[i]
            if i == L - 1:
                _attn(f"decoder.conv_blocks.{k}.attn.{j}", block_in, s)
        if i != 0:
            s.update({f"decoder.conv_blocks.{k}.upsample.conv.weight": (block_in, block_in, 3, 3),
                      f"decoder.conv_blocks.{k}.upsample.conv.bias": (block_in,)})
    s.update({"decoder.norm_out.weight": (block_in,), "decoder.norm_out.bias": (block_in,),
              "decoder.conv_out.weight": (3, block_in, 3, 3), "decoder.conv_out.bias": (3,),
              "quant_conv.weight": (e_dim, z, 1, 1), "quant_conv.bias": (e_dim,),
              "post_quant_conv.weight": (z, e_dim, 1, 1), "post_quant_conv.bias": (z,),
              "quantize.embedding.weight": (n_e, e_dim), "quantize.codebook_used": (65536,)})
    return s


def synthetic_state(seed: int = 0, **kw) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = {}
    for k, shape in llamagen_shapes(**kw).items():
        t = torch.randn(shape, generator=gen)
        if k.endswith((".conv1.weight", ".conv2.weight", ".conv_in.weight", ".conv_out.weight", ".conv.weight")):
            t = t / (shape[1] * shape[2] * shape[3]) ** 0.5  # keep activations in range through the network
        elif ".norm" in k and k.endswith(".weight"):
            t = 1 + 0.1 * t
        state[k] = t
    state["quantize.codebook_used"] = torch.zeros(65536)
    return state


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    state = synthetic_state()
    path = tmp_path_factory.mktemp("llamagen") / "vq_ds2.pt"
    torch.save({"model": state}, path)
    return state, path


def _save(tmp_path: Path, state: dict, name: str = "bad.pt") -> Path:
    torch.save({"model": state}, tmp_path / name)
    return tmp_path / name


def test_synthetic_checkpoint_imports_into_the_right_modules(synthetic):
    state, path = synthetic
    model = import_llamagen(path)
    cfg = model.config
    assert (cfg.ch, cfg.ch_mult, cfg.num_res_blocks, cfg.z_channels) == (CH, CH_MULT, NUM_RES, Z)
    assert (cfg.quantizer.codebook_size, cfg.quantizer.code_dim) == (N_E, E_DIM)
    assert cfg.quantizer.l2_normalize is True and cfg.quantizer.legacy_beta is False and cfg.quantizer.beta == 0.25
    assert cfg.resolution == 256 and cfg.attn_resolutions == (128,)
    # attention only at the lowest-resolution level, in both halves
    assert [len(level.attn) for level in model.encoder.down] == [0, NUM_RES]
    assert [len(level.attn) for level in model.decoder.up] == [0, NUM_RES + 1]
    own = model.state_dict()
    expected = {  # LlamaGen key -> this tokenizer's key, written out by hand
        "encoder.conv_blocks.0.res.1.conv2.weight": "encoder.down.0.block.1.conv2.weight",
        "encoder.conv_blocks.1.res.0.nin_shortcut.weight": "encoder.down.1.block.0.nin_shortcut.weight",
        "encoder.conv_blocks.1.attn.1.proj_out.weight": "encoder.down.1.attn.1.proj_out.weight",
        "encoder.conv_blocks.0.downsample.conv.weight": "encoder.down.0.downsample.conv.weight",
        "encoder.mid.0.norm1.weight": "encoder.mid.block_1.norm1.weight",
        "encoder.mid.1.q.weight": "encoder.mid.attn_1.q.weight",
        "encoder.mid.2.conv2.bias": "encoder.mid.block_2.conv2.bias",
        "decoder.mid.1.v.bias": "decoder.mid.attn_1.v.bias",
        "decoder.conv_blocks.0.res.2.conv1.weight": "decoder.up.1.block.2.conv1.weight",
        "decoder.conv_blocks.0.attn.2.k.weight": "decoder.up.1.attn.2.k.weight",
        "decoder.conv_blocks.0.upsample.conv.weight": "decoder.up.1.upsample.conv.weight",
        "decoder.conv_blocks.1.res.0.nin_shortcut.bias": "decoder.up.0.block.0.nin_shortcut.bias",
        "decoder.conv_blocks.1.res.2.norm2.weight": "decoder.up.0.block.2.norm2.weight",
        "quantize.embedding.weight": "quantize.embedding.weight",
        "post_quant_conv.weight": "post_quant_conv.weight",
    }
    for src, dst in expected.items():
        assert torch.equal(state[src], own[dst]), (src, dst)
    # every LlamaGen tensor but the usage buffer is used exactly once; left over: this quantizer's own buffers
    def fingerprints(tensors):
        return sorted((tuple(v.shape), round(float(v.double().sum()), 6)) for v in tensors)
    assert fingerprints(v for k, v in state.items() if k != "quantize.codebook_used") == \
        fingerprints(v for k, v in own.items() if k not in ("quantize.step", "quantize.last_used"))


def test_round_trip_through_save_pretrained(synthetic, tmp_path):
    _, path = synthetic
    model = import_llamagen(path)
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    codes = model.encode(images)
    assert codes.shape == (2, 8, 8) and codes.unique().numel() > 1
    loaded = VQGAN.from_pretrained(model.save_pretrained(tmp_path / "tok"))
    assert torch.equal(loaded.encode(images), codes)
    assert torch.equal(loaded.decode(codes), model.decode(codes))
    assert loaded.content_hash() == model.content_hash()


def test_training_save_with_args_namespace(synthetic, tmp_path):
    """LlamaGen's train_vq.py saves model, optimizer state, steps and `args` (an argparse.Namespace)."""
    state, path = synthetic
    full = tmp_path / "0010000.pt"
    torch.save({"model": state, "optimizer": {"state": {}, "param_groups": []}, "steps": 10000,
                "args": argparse.Namespace(vq_model="VQ-16", codebook_size=N_E, lr=1e-4)}, full)
    assert import_llamagen(full).content_hash() == import_llamagen(path).content_hash()


def test_cli_writes_a_pretrained_tokenizer(synthetic, tmp_path):
    _, path = synthetic
    out = tmp_path / "tok"
    result = subprocess.run([sys.executable, "-m", "vqgan", "import", "llamagen", str(path), "--out", str(out)],
                            cwd=REPO, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr
    assert "imported" in result.stdout and f"{N_E} x {E_DIM}" in result.stdout
    assert VQGAN.from_pretrained(out).content_hash() == import_llamagen(path).content_hash()


def test_unexpected_key_is_named(synthetic, tmp_path):
    state, _ = synthetic
    path = _save(tmp_path, {**state, "encoder.conv_blocks.0.extra.weight": torch.ones(3)})
    with pytest.raises(ConfigError, match=r"cannot express: encoder\.conv_blocks\.0\.extra\.weight") as err:
        import_llamagen(path)
    assert str(path) in str(err.value)


def test_missing_key_is_named(synthetic, tmp_path):
    state, _ = synthetic
    path = _save(tmp_path, {k: v for k, v in state.items() if k != "decoder.conv_blocks.0.attn.1.q.bias"})
    with pytest.raises(ConfigError, match=r"missing key\(s\) decoder\.conv_blocks\.0\.attn\.1\.q\.bias") as err:
        import_llamagen(path)
    assert str(path) in str(err.value)


def test_wrong_shape_is_named(synthetic, tmp_path):
    state, _ = synthetic
    path = _save(tmp_path, {**state, "decoder.conv_blocks.1.res.1.conv2.bias": torch.zeros(CH + 1)})
    with pytest.raises(ConfigError, match=r"decoder\.conv_blocks\.1\.res\.1\.conv2\.bias \(33,\) \(expected \(32,\)\)"):
        import_llamagen(path)


@pytest.mark.parametrize("change,named", [
    (lambda s: {**s, "encoder.mid.0.norm1.running_mean": torch.zeros(64)}, "norm_type='batch'"),
    (lambda s: {**{k: v for k, v in s.items() if "nin_shortcut" not in k or not k.startswith("encoder.conv_blocks.1")},
                "encoder.conv_blocks.1.res.0.conv_shortcut.weight": torch.zeros(64, 32, 3, 3),
                "encoder.conv_blocks.1.res.0.conv_shortcut.bias": torch.zeros(64)}, "conv_shortcut=True"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("encoder.conv_blocks.0.downsample.")},
     "resamp_with_conv=False"),
    (lambda s: {k: v for k, v in s.items() if not k.startswith("decoder.")}
     | {k: v for k, v in synthetic_state(ch_mult=(2, 2)).items() if k.startswith("decoder.")}, "decoder_ch_mult"),
])
def test_inexpressible_checkpoints_are_refused_by_name(synthetic, tmp_path, change, named):
    state, _ = synthetic
    path = _save(tmp_path, change(state))
    with pytest.raises(ConfigError, match=named.replace("(", r"\(").replace(")", r"\)")) as err:
        import_llamagen(path)
    assert str(path) in str(err.value)


def test_widths_other_than_multiples_of_32_groups_are_refused(tmp_path):
    """ch=16: the first res block normalises 16 channels, which this tokenizer would do with 16 groups."""
    path = _save(tmp_path, synthetic_state(ch=16, ch_mult=(2, 4)))
    with pytest.raises(ConfigError, match=r"channel width 16 \(ch=16, ch_mult=\[2, 4\]\) is not a multiple of "
                                          r"LlamaGen's 32 GroupNorm groups"):
        import_llamagen(path)


class Payload:
    """Would run code when unpickled with weights_only=False."""

    def __reduce__(self):
        return (print, ("unpickled arbitrary object",))


def test_arbitrary_pickled_objects_are_refused(synthetic, tmp_path, capsys):
    state, _ = synthetic
    torch.save({"model": state, "args": Payload()}, tmp_path / "evil.pt")
    with pytest.raises(ConfigError, match="weights_only") as err:
        import_llamagen(tmp_path / "evil.pt")
    assert "print" in str(err.value) and str(tmp_path / "evil.pt") in str(err.value)
    assert "unpickled arbitrary object" not in capsys.readouterr().out


# ---- (b) numerical equivalence with LlamaGen's own modules ---------------------------------------------
def _load_llamagen():
    src = os.environ.get("LLAMAGEN_SRC")
    if not src:
        msg = ("LLAMAGEN_SRC is not set: set it to a checkout of https://github.com/FoundationVision/LlamaGen "
               "to compare against tokenizer/tokenizer_image/vq_model.py")
        print(msg)
        pytest.skip(msg)
    path = Path(src) / "tokenizer" / "tokenizer_image" / "vq_model.py"
    if not path.is_file():
        pytest.fail(f"LLAMAGEN_SRC={src}: {path} not found")
    spec = importlib.util.spec_from_file_location("llamagen_vq_model_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _margins(latents: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    d = torch.cdist(latents.double(), codebook.double()).sort(dim=1).values
    return (d[:, 1] - d[:, 0]) / d[:, 1]


def test_matches_llamagen_reference(tmp_path):
    vq = _load_llamagen()
    torch.manual_seed(0)
    # LlamaGen's own VQModel (ch 128, num_res_blocks 2 are fixed there), small ch_mult / z / codebook
    ref = vq.VQModel(vq.ModelArgs(codebook_size=N_E, codebook_embed_dim=E_DIM, encoder_ch_mult=list(CH_MULT),
                                  decoder_ch_mult=list(CH_MULT), z_channels=Z)).eval()
    with torch.no_grad():  # move every parameter off its init (GroupNorm 1/0 included) so mapping errors show
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    images = torch.rand(2, 3, 16, 16) * 2 - 1
    with torch.no_grad():
        latents = torch.nn.functional.normalize(ref.quant_conv(ref.encoder(images)), dim=1)
        latents = latents.permute(0, 2, 3, 1).reshape(-1, E_DIM)
        gen = torch.Generator().manual_seed(0)
        for _ in range(200):  # codes drawn from the batch's own latents, with clear nearest-code margins
            codebook = latents[torch.randperm(len(latents), generator=gen)[:N_E]]
            if _margins(latents, codebook).min() > 1e-3:
                break
        else:
            pytest.fail("no codebook with clear margins found")
        # stored un-normalised (scaled rows): the importer must normalise the codebook as LlamaGen does
        ref.quantize.embedding.weight.copy_(codebook * (0.5 + torch.rand(N_E, 1, generator=gen)))
    path = tmp_path / "vq_ref.pt"
    torch.save({"model": ref.state_dict(), "steps": 0, "args": argparse.Namespace(vq_model="VQ-2")}, path)
    model = import_llamagen(path)
    B, h, w = 2, 8, 8
    with torch.no_grad():
        ref_quant, _, (_, _, ref_indices) = ref.encode(images)
        ref_codes = ref_indices.view(B, h, w)
        codes = model.encode(images)
        assert torch.equal(codes, ref_codes)
        assert ref_codes.unique().numel() > 4
        ref_images = ref.decode_code(ref_codes.reshape(-1), shape=(B, E_DIM, h, w))
        decode = (model.decode(codes) - ref_images.clamp(-1, 1)).abs().max().item()
        unclamped = (model.decode_latents(model.quantize.codes_to_latents(codes)) - ref_images).abs().max().item()
        recon = (model(images)[0] - ref(images)[0]).abs().max().item()
        latent = (model.encode_latents(images) - ref.quant_conv(ref.encoder(images))).abs().max().item()
    diffs = {"latents": latent, "decode": decode, "decode_unclamped": unclamped, "reconstruction": recon}
    print("max abs differences vs LlamaGen:", diffs)
    assert max(diffs.values()) < TOL, diffs
