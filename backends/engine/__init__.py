"""The format-independent core: format descriptions and the registry, quantized modules,
quantizing a module tree with a recipe, what it did (reports), byte census, safe file reading."""
