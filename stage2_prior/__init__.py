"""Stage 2: priors over the tokenizer's integer codes. Imports nothing from the tokenizer, data or eval.

    from stage2_prior import GPTPrior, PriorConfig, generate
    prior = GPTPrior(PriorConfig(vocab_sizes=(1024,), code_shape=(16, 16), num_classes=1000))
    logits, loss = prior(codes, labels)                    # codes (B, 16, 16), labels (B,)
    codes = generate(prior, labels=labels, cfg_scale=4.0, top_k=2000, seed=0)
"""
from stage2_prior.model import PRIOR_SIZES, GPTPrior, PriorConfig, PriorLoadError
from stage2_prior.sample import generate

__all__ = ["GPTPrior", "PriorConfig", "PriorLoadError", "PRIOR_SIZES", "generate"]
