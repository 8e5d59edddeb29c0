"""Losses that MONAI / torch do not already provide."""
