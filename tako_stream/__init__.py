"""tako-stream: run untrusted Python code from Kafka in locked-down Docker containers."""

__version__ = "0.1.0"
