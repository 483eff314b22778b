"""The Ray layer: Ray Train runs, Ray Tune sweeps and Ray job submission (thin wrappers)."""
