"""GGUF model files (llama.cpp's format): finding and opening them (files.py) and the tokenizer they carry
(tokenizer.py). Read with gguf-py (PyPI `gguf`), memory-mapped."""
