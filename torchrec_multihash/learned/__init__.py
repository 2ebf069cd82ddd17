"""Fitting learned hash functions (id -> row mappings) from data."""

from torchrec_multihash.learned.fit import (  # noqa: F401
    FitInputError,
    FitOptions,
    apply_mappings,
    fit_learned_mappings,
    fit_mappings,
    load_mappings,
    save_mappings,
)
