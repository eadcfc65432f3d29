"""Synthetic image/mask pairs.

Modules: generative (the generators' shared trainer and helpers), vae (paired VAE and
VAE-GAN), gan (SPADE GAN), diffusion (mask-conditioned diffusion model), shapes (statistical
shape model), masks (mask sources: new shapes or deformed real masks), pairs (masks ->
images -> filtered pairs), quality (the quality table of synthetic pairs).
"""
