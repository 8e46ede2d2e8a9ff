"""The host side of MILI: the ragged Batch, the model runner, the scheduler, the KV block pool and radix
prefix cache, sampling, and the engine that steps them (engine.py; async_engine.py for asyncio servers)."""
