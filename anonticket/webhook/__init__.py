"""Events for the service, delivered as Standard Webhooks (SPEC §13, docs/webhooks.md)."""
