"""Dataset layer: scan, buckets, captions, balancing, the epoch plan, batches (no models)."""
