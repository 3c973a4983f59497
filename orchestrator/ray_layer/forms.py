"""Runtime forms as Ray tasks: runtime bundles (exported once per base, started by the control
loop) and adapters' .onnx_adapter forms (after verification, from a front end).
orchestrator.runtime_forms decides when; their errors are unwrapped as verification's are.
"""

from __future__ import annotations

from typing import Any

from adapters_store.runtime_bundle import BundleRef, BundleSettings
from orchestrator.ray_layer.actors import unwrap_ray_errors
from orchestrator.ray_layer.runtime import ForwardedEnv


def export_bundle(
    store_url: str, env: ForwardedEnv, base_model_id: str, base_dir: str, settings: dict[str, Any]
) -> str:
    """Export a base model's runtime bundle into the store (runtime_forms.local_exporter)."""
    from adapters_store import open_store
    from orchestrator.runtime_forms import local_exporter

    store = open_store(store_url, env=env.values)
    try:
        bundle = BundleSettings(settings["precision"], tuple(settings["targets"]), settings["max_rank"])
        return local_exporter(store, base_model_id, base_dir, bundle).to_json()
    finally:
        store.close()


def convert_adapter(store_url: str, env: ForwardedEnv, sha256: str, key: str, bundle_json: str) -> dict[str, Any]:
    """Convert a verified adapter to its .onnx_adapter form (runtime_forms.local_converter)."""
    from adapters_store import open_store
    from orchestrator.runtime_forms import local_converter

    store = open_store(store_url, env=env.values)
    try:
        return local_converter(store, sha256, key, BundleRef.from_json(bundle_json))
    finally:
        store.close()


def ray_forms(store_url: str, env: ForwardedEnv, *, exports: bool) -> dict[str, Any]:
    """RuntimeForms options (orchestrator.server.build_orchestrator's `forms`) that run exports
    and conversions as Ray tasks."""
    import ray

    # An export runs the model builder (a CPU-heavy child process): one CPU of the cluster.
    export = ray.remote(num_cpus=1, max_retries=1)(export_bundle)
    convert = ray.remote(num_cpus=0, max_retries=2)(convert_adapter)

    def exporter(_store: Any, base_model_id: str, base_dir: str, settings: BundleSettings) -> BundleRef:
        body = {"precision": settings.precision, "targets": list(settings.targets), "max_rank": settings.max_rank}
        got = unwrap_ray_errors(lambda: ray.get(export.remote(store_url, env, base_model_id, base_dir, body)), "export")
        return BundleRef.from_json(got)

    def converter(_store: Any, sha256: str, key: str, bundle: BundleRef) -> dict[str, Any]:
        result: dict[str, Any] = unwrap_ray_errors(
            lambda: ray.get(convert.remote(store_url, env, sha256, key, bundle.to_json())), "conversion"
        )
        return result

    return {"exporter": exporter, "converter": converter, "exports": exports}
