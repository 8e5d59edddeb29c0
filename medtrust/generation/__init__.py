"""Generation: sampling, the diffusers pipeline, the evaluator networks."""
