"""Trust measurements as pure tensor functions plus thin torchmetrics accumulators."""
