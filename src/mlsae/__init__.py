"""mlsae: multi-layer sparse autoencoders on the residual stream of transformer language models."""

__version__ = "0.1.0"
