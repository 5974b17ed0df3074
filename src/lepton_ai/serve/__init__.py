"""Application layer: model deployments.

Replica processes (ASGI), the load balancer, health checks and the supervisor
that restarts and scales them.
"""
