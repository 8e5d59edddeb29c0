"""Run folders, entry-point logic (train / evaluate), Hydra resolvers and callbacks."""
