"""The per-worker training engine: one function that runs with or without Ray."""
