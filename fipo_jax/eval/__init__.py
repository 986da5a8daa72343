"""Evaluation: estimators (avg@k, pass@k, cons@k, response lengths) and result printing (cli)."""
