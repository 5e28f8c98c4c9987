"""appliance: a transparent service-mesh proxy."""

__version__ = "0.1.0"
