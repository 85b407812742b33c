"""The frontend process of `pagedserve serve`: the public GenerationService, tokenization and the clients' streams."""
