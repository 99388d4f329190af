"""Integrations with training and modeling libraries (transformers patches, trainers)."""
