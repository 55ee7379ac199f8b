"""OpenTelemetry for polybus: tracing and metrics as middleware (``pip install
polybus[otel]``; only ``opentelemetry-api`` is needed, the SDK and exporters are the
application's choice)."""
