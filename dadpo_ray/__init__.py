"""dadpo-ray: distil a teacher chat model into a small student with daDPO, on Ray."""

__version__ = "0.1.0"
