"""Inference: one generation — the request check, encode → denoise → decode, the sidecar, compilation of the
MMDiT and the cheap latent previews. The `Runtime` (sd35/runtime.py) drives it."""
