"""Training: configuration, 2D slice data, augmentation, the trainer and DDP set-up."""
