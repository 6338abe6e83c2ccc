"""``mpiep soak``: many dispatch/combine iterations, each checked against an independent
recomputation, to catch rare corruption (races, stale buffers) that a single test misses."""
