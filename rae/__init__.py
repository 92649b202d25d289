"""Representation autoencoders and diffusion transformers in pure PyTorch (no Ray here)."""
