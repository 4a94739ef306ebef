"""The versioned model repository on disk (layout, versions, latest pointer) and the onnxruntime session every reader of it uses."""
