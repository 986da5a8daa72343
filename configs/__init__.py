"""Run recipes: `python -m fipo_jax.main --config configs/<name>.py[:arg] --workdir DIR`."""
