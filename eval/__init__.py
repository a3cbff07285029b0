"""Checks of written artifacts against the engines that load them (vLLM conformance on CPU)."""
