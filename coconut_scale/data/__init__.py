"""The data wing: records and their validation, converters, the ProsQA-style generator, tokenization and its
cache, the curriculum, the latent-aligned collator and the global batch sampler."""
