"""GPU fitness of the prompt-embedding kernels on sm_80: every launch config the launchers can pick compiles
ahead of time without spills and within the shared memory (see tests/helpers/fitness.py)."""

from helpers.fitness import checks

(test_no_spills_and_shared_memory_fits,) = checks("embedding", 80)
