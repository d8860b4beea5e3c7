from tests.streams.execution.engine_bench import engine, fast_backoff

__all__ = ["engine", "fast_backoff"]
