"""The agent gateway: an OpenAI-compatible API on Ray Serve whose every call becomes training data."""
