"""Rollout: vLLM policy engines and the actors that run agent episodes on them."""
