"""The HTTP layer: webhooks, health and metrics, authentication, errors, strict JSON."""
