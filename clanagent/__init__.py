"""clanagent: a peer-to-peer agent for a clan of machines."""

__version__ = "0.1.0"
__all__ = ["__version__"]
