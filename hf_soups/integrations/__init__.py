"""Integrations with training loops: the `transformers.Trainer` callback."""
