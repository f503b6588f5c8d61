"""Worked examples of sublab's seams, built outside the package (docs/extending.md walks through them)."""
