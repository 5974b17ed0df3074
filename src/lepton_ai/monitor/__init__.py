"""Monitoring layer: the phi-accrual failure detector, Prometheus metrics and cluster events."""
