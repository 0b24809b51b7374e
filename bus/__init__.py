"""Message bus: NATS JetStream connectivity and an embedded server for dev/tests."""
