"""The data path: read RP2K, synthesise RP2K, pack WebDataset shards, stream them."""
