"""End-to-end pipelines over the models, samplers and text encoder (sd: plain SD text-to-image)."""
