"""Recorder: the trajectory store (PostgreSQL in a cluster, SQLite embedded)."""
