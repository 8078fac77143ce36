"""climber: large sequential ranking models in the style of Climber (CIKM 2025)."""

__version__ = "0.1.0"
