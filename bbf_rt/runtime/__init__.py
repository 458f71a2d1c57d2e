"""Runtime: output-timestamp planning, sampler, pipeline and caching."""
