"""The five-stage pipeline: input checks, the stages and the runner."""
