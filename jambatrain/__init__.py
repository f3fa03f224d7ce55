"""jambatrain: pretraining for Jamba-style hybrid (Mamba + attention + MoE) language models."""

__version__ = "0.1.0"
