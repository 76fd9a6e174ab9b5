"""Reading datasets, the training loaders and their augmentation (one spec for both loaders)."""
