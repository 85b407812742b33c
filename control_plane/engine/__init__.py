"""The engine process of `pagedserve serve`: the engine loop, the workers' step streams, metrics and the
EngineService the frontend relays requests over."""
