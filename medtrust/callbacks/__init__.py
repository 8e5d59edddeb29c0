"""Callbacks that compute trust measurements during validation."""
