"""Trainer: distributed GRPO over recorded groups as a Ray Train job (next issue)."""
