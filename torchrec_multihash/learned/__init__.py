"""Fitting learned hash functions (id -> row mappings) from data."""

from torchrec_multihash.learned.fit import FitOptions, fit_mappings, load_mappings, save_mappings  # noqa: F401
