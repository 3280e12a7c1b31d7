"""GGUF: llama.cpp block formats, written and read by QuantKit's own codec (header parser,
quantizer, decoder), gguf-py for the file layout, and the adapter that makes them formats."""
