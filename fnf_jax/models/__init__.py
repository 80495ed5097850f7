"""Linen modules of the diffusion stack (UNet, VAE, CLIP) and their weight conversion."""
