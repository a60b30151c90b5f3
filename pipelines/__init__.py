"""ConvForge pipelines: stage entry modules in `pipelines.stages`, the library code they share here."""
