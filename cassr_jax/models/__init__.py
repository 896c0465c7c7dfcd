"""Flax NNX models: SD-1.5 U-Net, VAE, CLIP text encoder, ControlNet, CasSR U-Net, RRDBNet, SCEdit."""
