"""sublab: run, measure and defend against subliminal learning (Cloud et al., 2025)."""

__version__ = "0.1.0"
