"""After-training tools: batch prediction over folders (predict) and which images to label next (suggest)."""
