"""I/O and architecture knowledge: config, role tables, streaming safetensors, artifact writer, Hub pull."""
