"""Parquet store of teacher responses, failures and runs, queried through DuckDB."""
