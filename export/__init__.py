"""Export stage: checkpoints → ONNX graphs (FP32/FP16/INT8 Q/DQ) → bundle; engine building on the target."""
