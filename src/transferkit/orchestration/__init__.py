"""What runs the stages: Prefect settings and server, the DVC workspace and its generated dvc.yaml, the data watcher, the server database, and the flows' policy and rendering."""
