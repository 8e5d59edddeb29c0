"""SAFEGEN's DDPM anomaly detector: partial-diffusion reconstruction and residual scoring against
the statistics of clean real images."""
