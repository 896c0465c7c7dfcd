"""Conversion of PyTorch checkpoints (diffusers, transformers, LDM single files, BasicSR, ncnn) to our models."""
