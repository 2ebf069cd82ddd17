"""Data: the Criteo TSV reader, id mappings and the batches the model consumes."""
