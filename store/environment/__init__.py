"""Environments computed as data: deltas to environment variables (uenv's semantics),
their JSON views, and profiles (store paths that describe an environment)."""
