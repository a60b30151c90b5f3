"""ConvForge pipeline stages (`python -m pipelines.<stage>`) and the library code they share."""
