"""Data domains: what teachers are asked to write (numbers first; code and chain-of-thought later)."""
