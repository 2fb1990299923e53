"""The training pipeline's stages, each a small function with one job (see qlora.pipeline)."""
