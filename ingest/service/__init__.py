"""The process around the pipeline: settings, logs, metrics, probes, security and topic checks."""
