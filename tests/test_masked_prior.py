"""Stage-2 masked (MaskGIT) prior: the masked-position loss, the mask schedule, T-pass parallel decoding,
kept codes, determinism, option and checkpoint errors, editing, and the console script."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from stage2_prior import GPTPrior, MaskedPrior, PriorConfig, PriorLoadError, build_prior, generate, load_prior
from stage2_prior.edit import class_transfer, extend, mix, resample, seam_band
from stage2_prior.masked import mask_fraction
from stage2_prior.masked_sample import DEFAULT_CHOICE_TEMPERATURE, DEFAULT_STEPS, commit_counts
from stage2_prior.model import CONFIG_NAME
from vqgan.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

SCHEDULES = ("cosine", "linear", "square")


def tiny_masked_prior(seed: int = 0, **overrides) -> MaskedPrior:
    kwargs = dict(prior_type="masked", dim=32, depth=2, heads=2, code_shape=(4, 4), vocab_sizes=(16,), num_classes=3)
    kwargs.update(overrides)
    torch.manual_seed(seed)
    return MaskedPrior(PriorConfig(**kwargs)).eval()


def tiny_ar_prior(seed: int = 0) -> GPTPrior:
    torch.manual_seed(seed)
    return GPTPrior(PriorConfig(dim=32, depth=2, heads=2, code_shape=(4, 4), vocab_sizes=(16,), num_classes=3)).eval()


def two_level_prior(num_classes: int = 3) -> MaskedPrior:
    return tiny_masked_prior(code_shape=(4, 4, 2), vocab_sizes=(16, 8), num_classes=num_classes)


def random_codes(prior, batch: int, seed: int = 0) -> torch.Tensor:
    """Valid codes (B, *code_shape) for every level of the prior."""
    g = torch.Generator().manual_seed(seed)
    sizes = torch.tensor(prior.config.level_sizes)                       # (D,)
    u = torch.rand(batch, *prior.code_shape[:2], len(sizes), generator=g)
    return (u * sizes).long().reshape(batch, *prior.code_shape)


def assert_in_range(prior, codes: torch.Tensor) -> None:
    """Every code lies in [0, size of its level)."""
    assert codes.shape[1:] == prior.code_shape and not codes.dtype.is_floating_point
    flat = codes.reshape(codes.shape[0], prior.code_shape[0], prior.code_shape[1], -1)
    for d, size in enumerate(prior.config.level_sizes):
        assert int(flat[..., d].min()) >= 0 and int(flat[..., d].max()) < size, f"level {d} out of [0, {size})"


def random_bool(shape, p: float, seed: int) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < p


class PassCounter:
    """Counts full forward passes of `prior.transformer` and records each pass's batch size."""

    def __init__(self, prior):
        self.batches: list[int] = []
        self.handle = prior.transformer.register_forward_hook(lambda module, inputs, output:
                                                              self.batches.append(inputs[0].shape[0]))

    def __enter__(self) -> "PassCounter":
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# ---- model: loss, mask schedule, mask checks, multi-level codes ----------------------------------
def test_loss_is_cross_entropy_over_the_masked_positions():
    prior = tiny_masked_prior()
    codes, labels = random_codes(prior, 3), torch.tensor([0, 1, 2])
    mask = random_bool((3, 16), 0.4, seed=1)
    mask[:, 0] = True                                                    # every row predicts something
    logits, loss = prior(codes, labels, mask=mask)
    assert logits.shape == (3, 16, 16) and loss.ndim == 0
    targets = prior.flatten_codes(codes)
    assert torch.allclose(loss, F.cross_entropy(logits[mask], targets[mask]), atol=1e-6)
    # not the mean over every position (which would also count the visible codes)
    assert not torch.allclose(loss, F.cross_entropy(logits.flatten(0, 1), targets.flatten()), atol=1e-4)


def test_loss_ignores_targets_at_unmasked_positions(monkeypatch):
    prior = tiny_masked_prior()
    codes, labels = random_codes(prior, 2, seed=3), torch.tensor([0, 2])
    mask = torch.zeros(2, 16, dtype=torch.bool)
    mask[0, [1, 5, 9]] = True
    mask[1, [0, 15]] = True
    seen = []
    fixed = torch.randn(2, 16, 16, generator=torch.Generator().manual_seed(0))

    def fixed_logits(tokens, cond):  # the network's output held fixed: only the loss's targets vary
        seen.append(tokens.clone())
        return fixed

    monkeypatch.setattr(prior, "forward_tokens", fixed_logits)
    _, loss = prior(codes, labels, mask=mask)
    # the network saw [MASK] exactly at the masked positions and the codes elsewhere
    assert torch.equal(seen[0], prior.flatten_codes(codes).masked_fill(mask, prior.mask_token))
    assert prior.mask_token == prior.config.null_token + 1

    changed = codes.reshape(2, 16).clone()
    changed[~mask] = (changed[~mask] + 7) % 16                           # every visible code differs
    _, same = prior(changed, labels, mask=mask)
    assert torch.equal(same, loss)

    changed = codes.reshape(2, 16).clone()
    changed[0, 5] = (changed[0, 5] + 1) % 16                             # one masked target differs
    _, other = prior(changed, labels, mask=mask)
    assert not torch.equal(other, loss)


def test_random_mask_counts_follow_the_schedule():
    L, rows = 16, 20000
    inverse_cdf = {  # P(count <= k) = P(gamma(r) <= k / L) for r ~ U(0, 1), from each schedule's closed form
        "cosine": lambda y: 1 - 2 / math.pi * math.acos(y),
        "linear": lambda y: y,
        "square": lambda y: 1 - math.sqrt(1 - y),
    }
    for schedule in SCHEDULES:
        prior = tiny_masked_prior(mask_schedule=schedule)
        torch.manual_seed(0)
        mask = prior.random_mask(rows)
        assert mask.shape == (rows, L) and mask.dtype == torch.bool
        counts = mask.sum(dim=1)
        assert int(counts.min()) >= 1 and int(counts.max()) <= L
        for k in range(1, L):
            expected = inverse_cdf[schedule](k / L)
            observed = float((counts <= k).float().mean())
            assert abs(observed - expected) < 0.015, (schedule, k, observed, expected)
        # positions are chosen uniformly: every position is masked about equally often
        per_position = mask.float().mean(dim=0)
        assert float((per_position - per_position.mean()).abs().max()) < 0.02
    torch.manual_seed(5)
    a = prior.random_mask(4)
    torch.manual_seed(5)
    assert torch.equal(prior.random_mask(4), a)                          # the global RNG decides


@pytest.mark.parametrize("schedule", SCHEDULES)
def test_mask_fraction_endpoints_and_shape(schedule):
    assert float(mask_fraction(0.0, schedule)) == 1.0
    end = float(mask_fraction(1.0, schedule))
    assert 0.0 <= end < 1e-12
    r = torch.linspace(0, 1, 101)
    gamma = mask_fraction(r, schedule)
    assert gamma.shape == (101,) and bool((gamma[1:] <= gamma[:-1]).all())  # non-increasing
    assert bool(((gamma >= 0) & (gamma <= 1)).all())
    mid = {"cosine": math.cos(math.pi / 4), "linear": 0.5, "square": 0.75}[schedule]
    assert float(mask_fraction(0.5, schedule)) == pytest.approx(mid, abs=1e-12)


def test_unknown_schedules_are_rejected():
    with pytest.raises(ValueError, match="unknown mask schedule"):
        mask_fraction(0.5, "exponential")
    with pytest.raises(ValueError, match="mask_schedule='exponential' is not supported"):
        PriorConfig(prior_type="masked", mask_schedule="exponential")
    with pytest.raises(ValueError, match="prior_type='diffusion' is not supported"):
        PriorConfig(prior_type="diffusion")


def test_bad_masks_are_rejected():
    prior = tiny_masked_prior()
    codes = random_codes(prior, 2)
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 16\)"):
        prior(codes, mask=torch.ones(2, 15, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 16\)"):
        prior(codes, mask=torch.ones(2, 4, 4, dtype=torch.bool))        # a grid, not the flat sequence
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(2, 16\)"):
        prior(codes, mask=torch.ones(2, 16, dtype=torch.long))
    with pytest.raises(ValueError, match="masks no position"):
        prior(codes, mask=torch.zeros(2, 16, dtype=torch.bool))


def test_forward_with_two_code_levels_keeps_each_level_to_its_vocabulary():
    prior = two_level_prior(num_classes=0)
    codes = random_codes(prior, 3, seed=2)
    assert codes.shape == (3, 4, 4, 2)
    mask = random_bool((3, 32), 0.5, seed=4)
    mask[:, :2] = True
    with torch.no_grad():
        logits, loss = prior(codes, mask=mask)
    assert logits.shape == (3, 32, 24) and torch.isfinite(loss)
    targets = prior.flatten_codes(codes)
    assert torch.allclose(loss, F.cross_entropy(logits[mask], targets[mask]), atol=1e-6)
    depth0, depth1 = logits[:, 0::2], logits[:, 1::2]
    assert bool(torch.isfinite(depth0[..., :16]).all()) and bool((depth0[..., 16:] == float("-inf")).all())
    assert bool(torch.isfinite(depth1[..., 16:]).all()) and bool((depth1[..., :16] == float("-inf")).all())
    probs = logits.softmax(dim=-1)
    assert float(probs[:, 0::2, 16:].sum()) == 0.0 and float(probs[:, 1::2, :16].sum()) == 0.0
    _, random_loss = prior(codes)                                        # a schedule mask of its own
    assert torch.isfinite(random_loss)
    # and the sampler never draws another level's code
    assert_in_range(prior, generate(prior, 4, steps=3, seed=0))


# ---- decoding: passes and commit schedule --------------------------------------------------------
@pytest.mark.parametrize("steps", [1, 4, 8])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "cfg3"])
def test_decoding_makes_exactly_steps_forward_passes(steps, guided):
    prior = tiny_masked_prior()
    labels = torch.tensor([0, 1, 2]) if guided else None
    with PassCounter(prior) as counter:
        codes = generate(prior, None if guided else 3, labels=labels, cfg_scale=3.0 if guided else 1.0,
                         steps=steps, seed=0)
    assert counter.batches == [6 if guided else 3] * steps     # guidance doubles the batch within one pass
    assert codes.shape == (3, 4, 4)
    assert_in_range(prior, codes)


def test_decoding_stops_once_every_free_position_is_decided():
    prior = tiny_masked_prior()
    keep = torch.ones(4, 4, dtype=torch.bool)
    keep[0, 1] = keep[2, 2] = keep[3, 0] = False                        # 3 free positions, T = 8
    codes = random_codes(prior, 2, seed=1)
    calls = []
    with PassCounter(prior) as counter:
        out = generate(prior, 2, keep_codes=codes, keep_mask=keep, steps=8, seed=0,
                       on_step=lambda s, tokens: calls.append(s))
    assert len(counter.batches) == 3 and calls == [0, 1, 2]
    assert torch.equal(out[:, keep], codes[:, keep])


def test_greedy_decoding_commits_the_most_confident_position_first():
    # linear schedule, T = L = 16: exactly one position is committed per step
    # rotary positions: this random model's greedy codes depend on their context (with the learned
    # default, nearly not), so a different commit order shows in the sample
    prior = tiny_masked_prior(mask_schedule="linear", positions="rotary")
    cond = prior.cond_tokens(torch.tensor([0, 2]), 2)
    with torch.no_grad():
        logits = prior.forward_tokens(torch.full((2, 16), prior.mask_token), cond)
    confidence, best = logits.log_softmax(dim=-1).max(dim=-1)                      # (2, 16)
    first = confidence.argmax(dim=1)
    steps = []
    out = generate(prior, labels=torch.tensor([0, 2]), temperature=0.0, choice_temperature=0.0, steps=16, seed=0,
                   on_step=lambda s, tokens: steps.append(tokens.clone()))
    assert len(steps) == 16
    decided = steps[0] != prior.mask_token
    assert decided.sum(dim=1).tolist() == [1, 1]
    assert decided.nonzero()[:, 1].tolist() == first.tolist()
    assert steps[0][decided].tolist() == best[torch.arange(2), first].tolist()
    assert torch.equal(prior.unflatten_tokens(steps[-1]), out)
    # greedy draws and no confidence noise: the seed does not matter
    assert torch.equal(generate(prior, labels=torch.tensor([0, 2]), temperature=0.0, choice_temperature=0.0,
                                steps=16, seed=1), out)
    # with confidence noise (and the same seed) the order, and so the sample, changes
    assert not torch.equal(generate(prior, labels=torch.tensor([0, 2]), temperature=0.0, choice_temperature=50.0,
                                    steps=16, seed=0), out)


def test_sampling_runs_in_eval_mode_and_restores_training():
    prior = tiny_masked_prior(dropout=0.5)
    greedy = dict(temperature=0.0, choice_temperature=0.0, steps=3)      # the logits alone decide
    reference = generate(prior, 4, **greedy)
    prior.train()
    assert torch.equal(generate(prior, 4, **greedy), reference)          # no dropout while sampling
    assert prior.training


@pytest.mark.parametrize("positions", ["rotary", "learned"])
def test_sampling_options_combine(positions):
    prior = two_level_prior() if positions == "rotary" else tiny_masked_prior(positions="learned")
    for options in (dict(top_k=3), dict(top_p=0.5), dict(temperature=0.5, top_k=12, top_p=0.9),
                    dict(weights_dtype=torch.bfloat16)):
        with PassCounter(prior) as counter:
            codes = generate(prior, labels=torch.tensor([1, 2]), cfg_scale=2.0, steps=3, seed=0, **options)
        assert counter.batches == [4, 4, 4], options
        assert_in_range(prior, codes)


def test_default_decoding_options():
    assert DEFAULT_STEPS == 8 and DEFAULT_CHOICE_TEMPERATURE == 4.5
    prior = tiny_masked_prior()
    with PassCounter(prior) as counter:
        default = generate(prior, 2, seed=3)
    assert len(counter.batches) == DEFAULT_STEPS
    assert torch.equal(default, generate(prior, 2, seed=3, steps=8, choice_temperature=4.5))


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("steps", [1, 2, 5, 8, 12, 40])
def test_commit_counts_commit_at_least_one_code_per_step(schedule, steps):
    free = torch.tensor([0, 1, 3, 7, 16, 64, 256])
    counts = commit_counts(free, steps, schedule)
    assert len(counts) == steps
    previous = free
    for remaining in counts:
        assert remaining.shape == free.shape and bool((remaining >= 0).all())
        left = previous > 0
        assert bool((remaining[left] <= previous[left] - 1).all())     # at least one committed while any is left
        assert bool((remaining[~left] == 0).all())
        previous = remaining
    assert bool((counts[-1] == 0).all())
    # the schedule decides whenever the one-per-step floor does not bind (many free positions)
    if steps <= 8:
        expected = [int(math.floor(float(mask_fraction((s + 1) / steps, schedule)) * 256)) for s in range(steps)]
        assert [int(c[-1]) for c in counts] == expected


def test_decoding_commits_what_commit_counts_say():
    prior = tiny_masked_prior(mask_schedule="linear")
    keep = torch.zeros(2, 4, 4, dtype=torch.bool)
    keep[0, 0, :3] = True                                                # row 0: 13 free, row 1: 16 free
    codes = random_codes(prior, 2)
    masked_left = []
    generate(prior, 2, keep_codes=codes, keep_mask=keep, steps=5, seed=0,
             on_step=lambda s, tokens: masked_left.append((tokens == prior.mask_token).sum(dim=1).tolist()))
    expected = commit_counts(torch.tensor([13, 16]), 5, "linear")
    assert masked_left == [c.tolist() for c in expected]


# ---- kept codes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("depth", [1, 2])
@pytest.mark.parametrize("per_row", [True, False], ids=["per-row", "shared"])
@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "cfg3"])
def test_kept_codes_are_never_changed(depth, per_row, guided):
    prior = tiny_masked_prior() if depth == 1 else two_level_prior()
    B = 3
    codes = random_codes(prior, B, seed=7)
    positions = random_bool((B, 4, 4) if per_row else (4, 4), 0.5, seed=8 + depth)
    positions.reshape(-1, 16)[:, 0] = False                              # something is sampled in every row
    keep = positions[..., None].expand(*positions.shape, 2) if depth == 2 else positions
    labels = torch.tensor([2, 0, 1]) if guided else None
    out = generate(prior, None if guided else B, labels=labels, cfg_scale=3.0 if guided else 1.0, temperature=1.0,
                   keep_codes=codes, keep_mask=keep, steps=4, seed=1)
    assert out.shape == codes.shape
    full = keep.expand(B, *prior.code_shape)
    assert torch.equal(out[full], codes[full])
    assert not torch.equal(out[~full], codes[~full])                     # the free positions were sampled
    assert_in_range(prior, out)


def test_a_keep_mask_keeping_everything_is_rejected():
    prior = tiny_masked_prior()
    with pytest.raises(ValueError, match="nothing to sample"):
        generate(prior, 2, keep_codes=random_codes(prior, 2), keep_mask=torch.ones(4, 4, dtype=torch.bool), steps=2)


# ---- determinism ---------------------------------------------------------------------------------
def test_seeds_decide_the_sample():
    prior = tiny_masked_prior()
    a = generate(prior, 4, labels=None, steps=4, seed=0)
    assert torch.equal(generate(prior, 4, steps=4, seed=0), a)
    assert not torch.equal(generate(prior, 4, steps=4, seed=1), a)
    guided = generate(prior, labels=torch.tensor([0, 1, 2, 0]), cfg_scale=3.0, steps=4, seed=0)
    assert torch.equal(generate(prior, labels=torch.tensor([0, 1, 2, 0]), cfg_scale=3.0, steps=4, seed=0), guided)


@pytest.mark.parametrize("guided", [False, True], ids=["unguided", "cfg3"])
def test_a_row_does_not_depend_on_the_other_rows_generators(guided):
    prior = tiny_masked_prior()
    labels = torch.tensor([1, 0, 2, 1]) if guided else None
    options = dict(labels=labels, cfg_scale=3.0 if guided else 1.0, steps=4)
    n = None if guided else 4

    def sample(seeds):
        return generate(prior, n, generator=[torch.Generator().manual_seed(s) for s in seeds], **options)

    first, second = sample([5, 1, 2, 3]), sample([5, 11, 12, 13])
    assert torch.equal(first[0], second[0])
    assert all(not torch.equal(first[i], second[i]) for i in range(1, 4))
    assert not torch.equal(sample([6, 1, 2, 3])[0], first[0])            # row 0 follows its own generator


# ---- errors, building and loading ----------------------------------------------------------------
def test_masked_only_options_are_rejected_for_an_autoregressive_prior():
    prior = tiny_ar_prior()
    with pytest.raises(ValueError, match="masked priors"):
        generate(prior, 1, steps=4)
    with pytest.raises(ValueError, match="masked priors"):
        generate(prior, 1, choice_temperature=1.0)


@pytest.mark.parametrize("options, match", [
    (dict(steps=0), "steps must be a positive integer"),
    (dict(steps=True), "steps must be a positive integer"),
    (dict(steps=2.0), "steps must be a positive integer"),
    (dict(choice_temperature=-1), "choice_temperature must be a finite number >= 0"),
    (dict(choice_temperature=float("nan")), "choice_temperature must be a finite number >= 0"),
    (dict(choice_temperature=True), "choice_temperature must be a finite number >= 0"),
])
def test_bad_decoding_options_are_rejected(options, match):
    with pytest.raises(ValueError, match=match):
        generate(tiny_masked_prior(), 1, **options)


def test_a_class_builds_only_its_own_prior_type():
    with pytest.raises(ValueError, match="GPTPrior builds prior_type='ar' priors.*prior_type='masked'"):
        GPTPrior(PriorConfig(prior_type="masked", dim=32, depth=1, heads=2, code_shape=(4, 4), vocab_sizes=(16,)))
    with pytest.raises(ValueError, match="MaskedPrior builds prior_type='masked' priors.*prior_type='ar'"):
        MaskedPrior(PriorConfig(dim=32, depth=1, heads=2, code_shape=(4, 4), vocab_sizes=(16,)))
    small = dict(dim=32, depth=1, heads=2, code_shape=(4, 4), vocab_sizes=(16,))
    assert type(build_prior(PriorConfig(prior_type="masked", **small))) is MaskedPrior
    assert type(build_prior(PriorConfig(**small))) is GPTPrior


def test_checkpoints_load_as_their_own_type(tmp_path):
    masked, ar = tiny_masked_prior(), tiny_ar_prior()
    masked.save_pretrained(tmp_path / "masked", tokenizer_hash="abc")
    ar.save_pretrained(tmp_path / "ar", tokenizer_hash="abc")
    assert json.loads((tmp_path / "masked" / CONFIG_NAME).read_text())["config"]["prior_type"] == "masked"

    with pytest.raises(PriorLoadError, match=r"prior_type='masked'.*load_prior"):
        GPTPrior.from_pretrained(tmp_path / "masked")
    with pytest.raises(PriorLoadError, match=r"prior_type='ar'.*MaskedPrior"):
        MaskedPrior.from_pretrained(tmp_path / "ar")

    loaded = load_prior(tmp_path / "masked", tokenizer_hash="abc")
    assert type(loaded) is MaskedPrior and not loaded.training and loaded.config == masked.config
    assert type(load_prior(tmp_path / "ar")) is GPTPrior
    assert type(MaskedPrior.from_pretrained(tmp_path / "masked")) is MaskedPrior
    labels = torch.tensor([0, 2])
    assert torch.equal(generate(loaded, labels=labels, cfg_scale=2.0, steps=3, seed=4),
                       generate(masked, labels=labels, cfg_scale=2.0, steps=3, seed=4))


def test_load_prior_reads_the_type_from_the_checkpoint(tmp_path):
    tiny_ar_prior().save_pretrained(tmp_path / "old", tokenizer_hash="abc")
    path = tmp_path / "old" / CONFIG_NAME
    meta = json.loads(path.read_text())
    del meta["config"]["prior_type"]                                     # written before prior types existed
    path.write_text(json.dumps(meta))
    assert type(load_prior(tmp_path / "old")) is GPTPrior
    meta["config"]["prior_type"] = "diffusion"
    path.write_text(json.dumps(meta))
    with pytest.raises(PriorLoadError, match="prior_type 'diffusion' is not supported"):
        load_prior(tmp_path / "old")


# ---- editing with a masked prior -----------------------------------------------------------------
def _hole(grid=(4, 4)) -> torch.Tensor:
    mask = torch.zeros(*grid, dtype=torch.bool)
    mask[1:3, 1:3] = True
    return mask


@pytest.mark.parametrize("depth", [1, 2])
def test_resample_keeps_every_code_outside_the_mask(depth):
    prior = tiny_masked_prior() if depth == 1 else two_level_prior()
    codes, mask = random_codes(prior, 3, seed=1), _hole()
    out = resample(prior, codes, mask, seed=0, seam_rounds=0, steps=3)
    assert out.shape == codes.shape
    assert torch.equal(out[:, ~mask], codes[:, ~mask])
    assert not torch.equal(out[:, mask], codes[:, mask])
    assert torch.equal(resample(prior, codes, mask, seed=0, steps=3), out)
    assert_in_range(prior, out)
    moved = class_transfer(prior, codes, 1, mask=mask, cfg_scale=3.0, steps=2)
    assert torch.equal(moved[:, ~mask], codes[:, ~mask])


def test_mix_with_a_masked_prior_changes_only_the_seam_band():
    prior = tiny_masked_prior()
    a, b = random_codes(prior, 2, seed=1), random_codes(prior, 2, seed=2)
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[:, 2:] = True
    spliced = torch.where(region, b, a)
    out = mix(a, b, region, prior=prior, seam_rounds=1, steps=2)
    band = seam_band(region[None])[0]
    assert torch.equal(out[:, ~band], spliced[:, ~band])
    assert_in_range(prior, out)


def test_extend_fills_a_larger_grid():
    prior = tiny_masked_prior()                                          # trained on 4x4
    wide = extend(prior, (6, 9), n=2, steps=2, seed=0)
    assert wide.shape == (2, 6, 9) and int(wide.min()) >= 0 and int(wide.max()) < 16
    assert torch.equal(extend(prior, (6, 9), n=2, steps=2, seed=0), wide)

    init = torch.randint(0, 16, (2, 6, 9), generator=torch.Generator().manual_seed(3))
    keep = torch.zeros(6, 9, dtype=torch.bool)
    keep[:, :4] = True                                                   # extend an image to the right
    out = extend(prior, (6, 9), init_codes=init, keep=keep, labels=torch.tensor([0, 2]), cfg_scale=2.0, steps=2)
    assert out.shape == (2, 6, 9)
    assert torch.equal(out[:, keep], init[:, keep])
    assert int(out.min()) >= 0 and int(out.max()) < 16


def test_extend_two_level_codes_with_a_masked_prior():
    prior = two_level_prior(num_classes=0)
    init = random_codes(prior, 1, seed=5)                                # (1, 4, 4, 2)
    grid = torch.zeros(1, 5, 7, 2, dtype=torch.long)
    grid[:, :4, :4] = init
    keep = torch.zeros(5, 7, dtype=torch.bool)
    keep[:4, :4] = True
    out = extend(prior, (5, 7), init_codes=grid, keep=keep, steps=2)
    assert out.shape == (1, 5, 7, 2)
    assert torch.equal(out[:, :4, :4], init)
    assert int(out[..., 0].max()) < 16 and int(out[..., 1].max()) < 8 and int(out.min()) >= 0


def test_extend_rejects_masked_options_for_an_autoregressive_prior():
    with pytest.raises(ValueError, match="masked priors"):
        extend(tiny_ar_prior(), (4, 6), n=1, steps=4)
    with pytest.raises(ValueError, match="masked priors"):
        extend(tiny_ar_prior(), (4, 6), n=1, choice_temperature=2.0)


# ---- the console script --------------------------------------------------------------------------
def _tokenizer(tiny_masked):
    return tiny_masked.parent.parent / "tokenizer"


def test_masked_checkpoint_records_its_type(tiny_masked):
    meta = json.loads((tiny_masked / CONFIG_NAME).read_text())
    assert meta["config"]["prior_type"] == "masked"
    assert type(load_prior(tiny_masked)) is MaskedPrior


def test_sample_command_with_a_masked_prior(tiny_masked, tmp_path):
    out = tmp_path / "samples"
    assert main(["sample", "--prior", str(tiny_masked), "--tokenizer", str(_tokenizer(tiny_masked)), "--out", str(out),
                 "--classes", "0,1", "--n", "2", "--steps", "4", "--cfg", "2"]) == 0
    assert sorted(p.name for p in out.glob("0*.png")) == [f"{i:06d}.png" for i in range(4)]
    assert (out / "grid.png").is_file()
    record = json.loads((out / "samples.json").read_text())
    assert record["prior_type"] == "masked" and record["steps"] == 4
    assert record["choice_temperature"] == DEFAULT_CHOICE_TEMPERATURE and record["classes"] == [0, 1]


def test_sample_command_rejects_steps_for_an_autoregressive_prior(tiny_masked, tmp_path, capsys):
    ar = tiny_masked.parent.parent / "prior_run" / "prior"
    code = main(["sample", "--prior", str(ar), "--tokenizer", str(_tokenizer(tiny_masked)),
                 "--out", str(tmp_path / "ar"), "--classes", "0", "--n", "1", "--steps", "4"])
    err = capsys.readouterr().err
    assert code == 2
    assert "vqgan sample: error:" in err and "masked priors" in err and "autoregressive" in err
    assert not (tmp_path / "ar" / "samples.json").exists()


def _write_images(tmp_path, count: int = 2) -> list[str]:
    paths = []
    for i, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)][:count]):
        path = tmp_path / f"in{i}.png"
        Image.new("RGB", (16, 16), colour).save(path)
        paths.append(str(path))
    return paths


def test_complete_command_with_a_masked_prior(tiny_masked, tmp_path):
    out = tmp_path / "completed"
    assert main(["complete", "--prior", str(tiny_masked), "--tokenizer", str(_tokenizer(tiny_masked)),
                 "--images", *_write_images(tmp_path), "--box", "8,8,16,16", "--samples", "2", "--label", "1",
                 "--steps", "3", "--choice-temperature", "2", "--out", str(out)]) == 0
    record = json.loads((out / "completion.json").read_text())
    assert record["kept_codes_unchanged"] and record["regenerated_positions"] == 16
    assert record["prior_type"] == "masked" and record["steps"] == 3 and record["choice_temperature"] == 2.0


def test_edit_inpaint_command_with_a_masked_prior(tiny_masked, tmp_path):
    out = tmp_path / "inpainted"
    assert main(["edit", "inpaint", "--prior", str(tiny_masked), "--tokenizer", str(_tokenizer(tiny_masked)),
                 "--images", *_write_images(tmp_path), "--box", "4,4,12,12", "--samples", "2", "--steps", "3",
                 "--cfg", "2", "--label", "2", "--out", str(out)]) == 0
    record = json.loads((out / "edit.json").read_text())
    assert record["command"] == "inpaint" and record["images"] == 2 and record["samples_per_image"] == 2
    assert record["masked_positions"] == 16 and record["kept_positions"] == 48
    assert record["kept_codes_unchanged"] is True and record["steps"] == 3
    assert (out / "grid.png").is_file() and len(list(out.glob("row*.png"))) == 2 * 4


# ---- `vqgan run`: options added with the masked prior keep earlier runs' stages ------------------
def test_run_settings_hash_ignores_new_options_at_their_defaults():
    import dataclasses
    import hashlib

    from common import config_to_dict
    from stage2_prior.train import PriorRunConfig
    from vqgan.run import EvalConfig, _settings_hash

    prior, evaluation = PriorRunConfig(), EvalConfig()
    before = config_to_dict(prior)
    del before["model"]["mask_schedule"]                         # what a run made before them hashed
    old_eval = {k: v for k, v in config_to_dict(evaluation).items() if k not in ("decode_steps", "choice_temperature")}
    expected = hashlib.sha256(json.dumps([before, old_eval], sort_keys=True, default=str).encode()).hexdigest()[:16]
    assert _settings_hash(prior, evaluation) == expected
    masked = dataclasses.replace(prior, model=dataclasses.replace(prior.model, prior_type="masked"))
    assert _settings_hash(masked, evaluation) != expected
    assert _settings_hash(prior, dataclasses.replace(evaluation, decode_steps=4)) != expected
    linear = dataclasses.replace(prior, model=dataclasses.replace(prior.model, mask_schedule="linear"))
    assert _settings_hash(linear, evaluation) != expected
