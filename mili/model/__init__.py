"""MAX graph pieces for Qwen3: wrappers around MILI's Mojo custom ops (`ops.py`)."""
