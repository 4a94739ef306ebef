"""transferkit: adapt a pretrained image model to a new task with few labels, and ship it as ONNX."""

__version__ = "0.1.0"
