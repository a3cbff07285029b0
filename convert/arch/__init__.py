"""Architecture tables: checkpoint tensor name -> role, per model family."""
