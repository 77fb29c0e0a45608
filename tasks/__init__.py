"""Thin Prefect tasks around the navcache library: retries, cache policies, artifacts. No domain logic."""
