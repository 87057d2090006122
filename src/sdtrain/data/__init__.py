"""Dataset layer: scan, buckets, captions, balancing, the epoch plan and batches (never imports models)."""
