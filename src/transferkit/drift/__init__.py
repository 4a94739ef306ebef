"""The drift stage: domain shift between source and target data, with Evidently's HTML report."""
