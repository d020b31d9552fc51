"""Model folders to other formats and back: MONAI bundles, TorchScript, ONNX, MONAI checkpoints."""
