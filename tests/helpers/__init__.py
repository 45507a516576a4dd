"""Shared test helpers, which test modules import (never each other): cases (attention inputs: one Case builder),
families (the tiny model families table), models (tiny(family), method configs, batches), invariants (the
invariants matrix machinery), numerics (error rules, gradcheck, spec adapters)."""
