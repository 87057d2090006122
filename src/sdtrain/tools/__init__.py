"""Data-preparation tools behind the CLI: captioning, tagging, metadata JSON, latent caches."""
