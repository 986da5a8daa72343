"""See fipo_jax/__init__.py for the package map."""
