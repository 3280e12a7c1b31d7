"""One adapter per quantization library (torchao, bitsandbytes, optimum-quanto). Each
registers its formats on import; the library itself is imported when a format is used."""
