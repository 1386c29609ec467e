"""Generation: the jitted sampler and the batched text helpers."""
