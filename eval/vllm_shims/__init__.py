"""Import shims for the vLLM load check, loaded by file path inside the vLLM venv only (see README.md here)."""
