"""The data plane: client protocol, upstream pool, balancers, health, generations, worker."""
