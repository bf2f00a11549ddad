"""mc: multi-positive contrastive skeleton training."""
