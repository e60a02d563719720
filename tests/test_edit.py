"""Editing in code space: the functions on code grids and `vqgan edit ...` end to end."""
from __future__ import annotations

import json
import math

import pytest
import torch
from PIL import Image

from stage1_tokenizer import VQGAN, QuantizerConfig, VQGANConfig
from stage2_prior import GPTPrior, PriorConfig, generate
from stage2_prior.edit import (check_mask, class_transfer, extend, fraction_mask, interpolate, mix, resample,
                               seam_band, window_origin)
from stage2_prior.edit_images import grid_mask, kept_region_psnr, png_pixel_mask
from vqgan.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")


def _prior(code_shape=(4, 4), vocab=(16,), num_classes=3) -> GPTPrior:
    torch.manual_seed(0)
    return GPTPrior(PriorConfig(vocab_sizes=vocab, code_shape=code_shape, num_classes=num_classes,
                                dim=32, depth=2, heads=2)).eval()


def _hole() -> torch.Tensor:
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[1:3, 1:3] = True
    return mask


def test_resample_keeps_everything_outside_the_mask_and_the_seam_band():
    prior, codes = _prior((6, 6)), torch.randint(0, 16, (3, 6, 6), generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(6, 6, dtype=torch.bool)
    mask[2:4, 2:4] = True
    out = resample(prior, codes, mask, seed=0)
    assert torch.equal(out[:, ~mask], codes[:, ~mask])
    assert not torch.equal(out[:, mask], codes[:, mask])
    assert torch.equal(resample(prior, codes, mask, seed=0), out)          # seeded
    band = seam_band(mask[None])[0]
    ring = torch.zeros(6, 6, dtype=torch.bool)
    ring[1:5, 1:5] = True
    assert torch.equal(band, ring)                                         # both sides of the edge, not the rest
    smoothed = resample(prior, codes, mask, seed=0, seam_rounds=2)
    assert torch.equal(smoothed[:, ~ring], codes[:, ~ring])
    assert not torch.equal(smoothed[:, ring & ~mask], codes[:, ring & ~mask])


def test_resample_works_on_multi_level_codes():
    prior = _prior(code_shape=(4, 4, 2), vocab=(16, 8), num_classes=0)
    codes = torch.stack([torch.randint(0, 16, (2, 4, 4)), torch.randint(0, 8, (2, 4, 4))], dim=-1)
    out = resample(prior, codes, _hole(), seed=3)
    assert out.shape == codes.shape and int(out[..., 1].max()) < 8
    assert torch.equal(out[:, ~_hole()], codes[:, ~_hole()])


def test_masks_are_checked():
    with pytest.raises(ValueError, match="no code position"):
        check_mask(torch.zeros(4, 4, dtype=torch.bool), (4, 4), 1)
    with pytest.raises(ValueError, match="every code position"):
        check_mask(torch.ones(4, 4, dtype=torch.bool), (4, 4), 1)
    with pytest.raises(ValueError, match="code grid"):
        check_mask(torch.ones(3, 4, dtype=torch.bool), (4, 4), 1)
    assert int(fraction_mask((4, 4), 0.5).sum()) == 8 and fraction_mask((4, 4), 0.5)[3].all()
    assert int(fraction_mask((4, 4), 0.25, "random", seed=1).sum()) == 4
    centre = fraction_mask((4, 4), 0.25, "center")
    assert centre[1:3, 1:3].all() and int(centre.sum()) == 4
    pixels = torch.zeros(16, 16, dtype=torch.bool)
    pixels[5, 9] = True                                  # one pixel marks its whole code position
    assert grid_mask(pixels, 4).nonzero().tolist() == [[1, 2]]


def test_kept_region_psnr_ignores_the_edit_and_its_seam():
    reference = torch.zeros(1, 3, 8, 8)
    edited = reference.clone()
    edited[..., 4:, :] = 1.0                                # the edit: rows 2-3 of a 4x4 grid (factor 2)
    edited[..., 2:4, :] += 0.1                              # the seam row: the decoder spreads the edit
    mask = torch.zeros(4, 4, dtype=torch.bool)
    mask[2:] = True
    assert kept_region_psnr(edited, reference, mask, 2) == pytest.approx(100.0)   # only row 0 is far
    assert kept_region_psnr(edited, reference, mask, 2, margin=0) == pytest.approx(10 * math.log10(2 / 0.05 ** 2))  # half its rows off
    assert kept_region_psnr(edited, reference, torch.ones(4, 4, dtype=torch.bool).logical_xor(
        torch.eye(4, dtype=torch.bool)), 2) is None


def test_class_transfer_resamples_under_the_target_class():
    prior, codes = _prior(), torch.randint(0, 16, (2, 4, 4))
    out = class_transfer(prior, codes, torch.tensor([2, 1]), resample_fraction=0.5, cfg_scale=2.0)
    assert torch.equal(out[:, :2], codes[:, :2])         # raster order keeps the top half
    with pytest.raises(ValueError, match=r"class ids must lie in \[0, 3\)"):
        class_transfer(prior, codes, torch.tensor([3, 0]))
    with pytest.raises(ValueError, match="class-conditional"):
        class_transfer(_prior(num_classes=0), codes, torch.tensor([0, 0]))


def test_mix_and_interpolate_swap_codes():
    a, b = torch.zeros(1, 4, 4, dtype=torch.long), torch.full((1, 4, 4), 5)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:, 2:] = True
    assert torch.equal(mix(a, b, region), torch.where(region, b, a))
    harmonised = mix(a, b, region, prior=_prior(), seam_rounds=1)
    far = ~(seam_band(region[None])[0])
    assert torch.equal(harmonised[:, far], torch.where(region, b, a)[:, far])
    frames = interpolate(a, b, steps=5)
    assert torch.equal(frames[0], a) and torch.equal(frames[-1], b)
    assert [int((f == 5).sum()) for f in frames] == [0, 4, 8, 12, 16]
    random = interpolate(a, b, steps=3, order="random", seed=0)
    assert int((random[1] == 5).sum()) == 8 and not torch.equal(random[1], frames[2])
    assert torch.equal(interpolate(a, b, steps=5, order="center")[1][0], fraction_mask((4, 4), 0.25, "center") * 5)


def test_extend_on_the_trained_grid_is_the_plain_sampler():
    prior = _prior()
    labels = torch.tensor([0, 2])
    wide = extend(prior, (4, 4), labels=labels, cfg_scale=2.0, seed=5, top_k=8)
    plain = generate(prior, labels=labels, cfg_scale=2.0, seed=5, top_k=8, use_cache=False)
    assert torch.equal(wide, plain)


@pytest.mark.parametrize("code_shape,vocab", [((4, 4), (16,)), ((4, 4, 2), (16, 8))])
def test_extend_wider_every_window_is_consistent(code_shape, vocab):
    prior = _prior(code_shape=code_shape, vocab=vocab, num_classes=0)
    D = prior.config.code_depth
    start = torch.randint(0, 8, (2, 4, 4, D)) if D > 1 else torch.randint(0, 8, (2, 4, 4))
    init = torch.zeros(2, 6, 8, *start.shape[3:], dtype=torch.long)
    init[:, :4, :4] = start
    keep = torch.zeros(6, 8, dtype=torch.bool)
    keep[:4, :4] = True
    codes = extend(prior, (6, 8), init_codes=init, keep=keep, temperature=0)   # greedy: checkable
    assert codes.shape == (2, 6, 8, *start.shape[3:])
    assert torch.equal(codes[:, :4, :4], start)                                # the kept overlap
    offsets = prior.level_offsets
    full = (codes if D > 1 else codes[..., None]) + offsets                     # (B, 6, 8, D) token ids
    null = torch.full((2, 1), prior.config.null_token)
    for i in range(6):
        for j in range(8):
            if keep[i, j]:
                continue
            oi, oj = window_origin(i, 6, 4), window_origin(j, 8, 4)
            window = full[:, oi:oi + 4, oj:oj + 4].reshape(2, -1)
            for d in range(D):
                t = ((i - oi) * 4 + (j - oj)) * D + d
                logits = prior.mask_logits(prior.forward_tokens(torch.cat([null, window[:, :t]], 1))[:, -1], t)
                assert torch.equal(logits.argmax(-1), full[:, i, j, d]), (i, j, d)
    with pytest.raises(ValueError, match="at least the prior's trained grid"):
        extend(prior, (3, 8), n=1)


# ---- the command line ---------------------------------------------------------------------------
def _image(path, colour) -> str:
    Image.new("RGB", (16, 16), colour).save(path)
    return str(path)


def test_edit_commands_end_to_end(tiny_stage2, tmp_path):
    pair = ["--prior", str(tiny_stage2 / "prior_run" / "prior"), "--tokenizer", str(tiny_stage2 / "tokenizer")]
    a, b = _image(tmp_path / "a.png", (200, 30, 30)), _image(tmp_path / "b.png", (30, 30, 200))
    mask = Image.new("L", (16, 16), 0)
    mask.paste(255, (0, 8, 6, 16))       # factor 2: x 0..5 touches code columns 0-2, y 8..15 rows 4-7
    mask.save(tmp_path / "mask.png")

    assert main(["edit", "inpaint", *pair, "--images", a, b, "--mask", str(tmp_path / "mask.png"), "--samples", "2",
                 "--seam-rounds", "0", "--out", str(tmp_path / "inpaint")]) == 0
    record = json.loads((tmp_path / "inpaint" / "edit.json").read_text())
    assert record["masked_positions"] == 12 and record["kept_codes_unchanged"]
    assert len(list((tmp_path / "inpaint").glob("row*.png"))) == 2 * 4 and (tmp_path / "inpaint" / "grid.png").is_file()

    assert main(["edit", "transfer", *pair, "--images", a, "--to-class", "2", "--resample", "0.25,0.75",
                 "--out", str(tmp_path / "transfer")]) == 0
    record = json.loads((tmp_path / "transfer" / "edit.json").read_text())
    assert record["resampled_fractions"] == [0.25, 0.75] and record["kept_codes_unchanged"]
    assert all(10 < p < 100 for p in record["kept_region_psnr_db"])  # a random decoder: only sanity here

    assert main(["edit", "mix", *pair, "--image-a", a, "--image-b", b, "--box", "8,0,16,16",
                 "--out", str(tmp_path / "mix")]) == 0
    assert json.loads((tmp_path / "mix" / "edit.json").read_text())["kept_codes_unchanged"]
    assert main(["edit", "interpolate", "--tokenizer", pair[3], "--image-a", a, "--image-b", b, "--steps", "4",
                 "--out", str(tmp_path / "interp")]) == 0
    assert len(list((tmp_path / "interp").glob("row000_*.png"))) == 6

    assert main(["edit", "extend", *pair, "--width", "32", "--n", "2", "--label", "1", "--image", a,
                 "--out", str(tmp_path / "wide")]) == 0
    record = json.loads((tmp_path / "wide" / "edit.json").read_text())
    assert record["code_grid"] == [8, 16] and record["kept_codes_unchanged"]
    with Image.open(tmp_path / "wide" / "row000_00.png") as img:
        assert img.size == (32, 16)


def test_edit_errors_are_clear(tiny_stage2, tmp_path, capsys):
    pair = ["--prior", str(tiny_stage2 / "prior_run" / "prior"), "--tokenizer", str(tiny_stage2 / "tokenizer")]
    a = _image(tmp_path / "a.png", (200, 30, 30))
    Image.new("L", (20, 16), 255).save(tmp_path / "wrong.png")
    Image.new("L", (16, 16), 0).save(tmp_path / "empty.png")

    def error(*args: str) -> str:
        assert main(["edit", *args]) == 2
        return capsys.readouterr().err

    assert "must match the image size" in error("inpaint", *pair, "--images", a, "--mask", str(tmp_path / "wrong.png"),
                                                "--out", str(tmp_path / "x"))
    assert "selects no code position" in error("inpaint", *pair, "--images", a, "--mask",
                                               str(tmp_path / "empty.png"), "--out", str(tmp_path / "x"))
    assert "nothing is kept" in error("inpaint", *pair, "--images", a, "--box", "0,0,16,16", "--out", str(tmp_path / "x"))
    assert "class ids must lie in [0, 3)" in error("transfer", *pair, "--images", a, "--to-class", "7",
                                                   "--out", str(tmp_path / "x"))
    torch.manual_seed(1)
    other = VQGAN(VQGANConfig(resolution=16, ch=16, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(),
                              z_channels=8, norm_groups=8, quantizer=QuantizerConfig(codebook_size=16, code_dim=4)))
    other.save_pretrained(tmp_path / "other")
    assert "tokenizer" in error("inpaint", "--prior", pair[1], "--tokenizer", str(tmp_path / "other"), "--images", a,
                                "--box", "0,0,8,8", "--out", str(tmp_path / "x"))
    assert png_pixel_mask(tmp_path / "empty.png", (16, 16)).sum() == 0
