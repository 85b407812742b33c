"""Starting the processes `pagedserve serve` runs beside its engine: local workers, the frontend, the built-in model."""
