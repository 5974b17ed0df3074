"""Application layer: model deployments as replica processes (ASGI), the load balancer and health checks."""
