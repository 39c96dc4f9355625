"""Other libraries' public APIs on onnxcam: the same calls, explained on ONNX Runtime from an explainable file exported
once (`pytorch_grad_cam`: pytorch-grad-cam 1.5's)."""
