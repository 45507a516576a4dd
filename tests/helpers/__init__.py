"""Shared test helpers: cases (attention and embedding inputs), models (tiny 🤗 models and method configs),
numerics (error rules, gradcheck, spec adapters). Test modules import these, never each other."""
