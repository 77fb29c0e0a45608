"""navcache provisioning library (ground side). Plain Python: no Prefect imports here."""

__version__ = "0.1.0"
