"""Integrations with model libraries (🤗 transformers, TRL)."""
