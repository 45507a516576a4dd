"""GPU fitness of the fused kernel and the split path's merge kernels on sm_90: every launch config the launchers can pick compiles
ahead of time without spills and within the shared memory (see tests/helpers/fitness.py)."""

from helpers.fitness import checks

test_no_spills_and_shared_memory_fits, test_attention_configs_cover_what_the_launcher_picks = checks("attention", 90)
