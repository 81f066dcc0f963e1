"""Pure array functions (no Flax state): attention, ring attention, LM head."""
