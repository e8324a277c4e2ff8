"""Command-line tools: checkpoint averaging, colour transfer, latent caching, weight conversion,
scoring, benchmarks."""
