"""Shards -> stream -> DALI -> batch: the data side of distillery."""

__version__ = "0.1.0"
