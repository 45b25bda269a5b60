"""Reconciler: an exact, durable record of asynchronous AI-generation tasks."""

__version__ = "0.1.0"
