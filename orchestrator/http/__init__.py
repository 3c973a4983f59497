"""The orchestrator's HTTP listener: Prometheus /metrics, the JSON API for dashboards and the web
console, on the gRPC server's event loop (see server.py)."""
