"""Counters shared by the workers of a host (local, shared memory) or by every node (redis)."""
