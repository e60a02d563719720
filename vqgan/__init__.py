"""The `vqgan` console script. Nothing in the library imports this package."""

# the stages of `vqgan run`, in order (here so the CLI can list them without importing torch)
RUN_STAGES = ("tokenizer", "encode", "prior", "sample", "eval_tokenizer", "eval_samples", "report")
