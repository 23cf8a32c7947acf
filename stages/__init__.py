"""The MNIST pipeline's stages: one module per DVC stage, plus the shared library in ``stages.lib``."""
