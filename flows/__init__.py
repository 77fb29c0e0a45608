"""Prefect flows: DAG wiring only."""
