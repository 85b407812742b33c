"""Model definitions written for paged attention, one module per architecture family."""
