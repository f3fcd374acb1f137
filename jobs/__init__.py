"""Ray job entrypoints: thin wrappers that parse a config and call the pipeline."""
