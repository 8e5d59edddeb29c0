"""Data: sources (records), phantoms, splits, transforms and the datamodule."""
