"""The host side of MILI: batches, the model runner, and (to come) scheduler, caches and sampling."""
