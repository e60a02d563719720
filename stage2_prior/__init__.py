"""Stage 2: priors over the tokenizer's integer codes. Imports nothing from the tokenizer, data or eval.

    from stage2_prior import GPTPrior, MaskedPrior, PriorConfig, generate, load_prior
    prior = GPTPrior(PriorConfig(vocab_sizes=(1024,), code_shape=(16, 16), num_classes=1000))
    logits, loss = prior(codes, labels)                    # codes (B, 16, 16), labels (B,)
    codes = generate(prior, labels=labels, cfg_scale=4.0, top_k=2000, seed=0)
    masked = MaskedPrior(PriorConfig(prior_type="masked", vocab_sizes=(1024,), code_shape=(16, 16)))
    codes = generate(masked, 16, steps=8, seed=0)          # 8 parallel decoding passes
    prior = load_prior("runs/x/prior")                     # either type, from the checkpoint
"""
from stage2_prior.load import PRIOR_CLASSES, build_prior, load_prior
from stage2_prior.masked import MaskedPrior
from stage2_prior.model import PRIOR_SIZES, CodePrior, GPTPrior, PriorConfig, PriorLoadError
from stage2_prior.sample import generate

__all__ = ["CodePrior", "GPTPrior", "MaskedPrior", "PriorConfig", "PriorLoadError", "PRIOR_CLASSES", "PRIOR_SIZES",
           "build_prior", "generate", "load_prior"]
