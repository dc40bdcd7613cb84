"""Prefect flows and deployments for distill."""
