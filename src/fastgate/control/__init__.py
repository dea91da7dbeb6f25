"""The control plane: the state store, the workers' directory of it, the admin API and its process."""
