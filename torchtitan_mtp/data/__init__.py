"""Data: the embedded arithmetic task and its tokenizer."""
