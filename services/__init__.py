"""The BentoML service that serves the trained models."""
