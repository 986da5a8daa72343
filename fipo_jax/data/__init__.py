"""Data: verl-schema rows (`verl`), tokenizers (`tokenizer`), grain pipelines with resumable
state (`pipeline`), and the synthetic arithmetic task of the embedded default (`synthetic`)."""
