"""Source models and what is computed from them: architectures, the zoo of packaged and hub sources, ensembles, cached embeddings (and their Dask pool), and the no-transfer baseline models."""
