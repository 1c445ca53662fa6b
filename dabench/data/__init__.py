"""Datasets: domain specs, the pair split protocol, and the embedded domains."""

from .core import DataError, DomainSpec, PairSplit, Protocol, make_split, resize_images

__all__ = ["DataError", "DomainSpec", "PairSplit", "Protocol", "make_split", "resize_images"]
