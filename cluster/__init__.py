"""Ziggurat's control plane: configuration, the command line, job entrypoints and (soon) the controller."""
