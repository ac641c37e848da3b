"""kvstress: a long-context stress tester for KV-cache compression."""

__version__ = "0.1.0"
