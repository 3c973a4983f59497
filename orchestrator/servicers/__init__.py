"""Thin gRPC servicers: parse, call one Orchestrator method, map errors, reply."""
