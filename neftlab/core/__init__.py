"""The ground floor, which imports nothing of neftlab above it: errors, rank and collectives, files and the run
directory, the claim of a run, caches, statistics."""
