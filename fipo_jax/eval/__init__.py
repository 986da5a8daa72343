"""Evaluation CLI (`python -m fipo_jax.eval`) and result printing (cli); the estimators
(avg@k, pass@k, cons@k, response lengths) are pure math in `fipo_jax.estimators`."""
