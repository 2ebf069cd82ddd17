"""Benchmarks and studies: quality against memory, speed against TorchRec's own tables."""
