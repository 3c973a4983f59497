"""Runtime bundles and adapter forms from the orchestrator: the export's graph and manifest, what
the builder cannot take, and the device-facing RPCs (NOT_FOUND, UNAVAILABLE while being made,
FAILED_PRECONDITION with the reason) against a real gRPC server and file store."""

from __future__ import annotations

import json
from pathlib import Path

import grpc
import pytest

from adapters_store import download_from_url, model_fingerprint, upload_to_url
from adapters_store.onnx_adapter import check_form
from adapters_store.runtime_bundle import BundleSettings, read_bundle_manifest, unpack_bundle
from orchestrator.bundle_export import ExportError, export_bundle
from protos.pocketlora.v1 import agent_service_pb2 as apb
from protos.pocketlora.v1 import operator_service_pb2 as opb
from protos.pocketlora.v1 import types_pb2 as tpb
from tests.support.onnx_models import TinyBundle, make_lora, pack_lora
from tests.support.orch import ENROLL_TOKEN, ServerThread, dev_md, op_md
from tests.support.tiny_models import make_tiny_gpt2, make_tiny_llama
from tests.support.waiting import wait_for

ONNX = tpb.INFERENCE_RUNTIME_ONNX


def test_export_opens_every_lora_weight_as_a_rank_symbolic_input(tiny_bundle: TinyBundle) -> None:
    import onnx

    manifest = read_bundle_manifest(tiny_bundle.bundle)
    assert manifest.base_fingerprint == model_fingerprint(tiny_bundle.base)
    assert manifest.settings.precision == "fp32" and manifest.tools["onnxruntime-genai"] == "0.18.0"
    assert len(manifest.lora_inputs) == 2 * 4 * 2  # layers x targets x (A, B)
    model = onnx.load(str(tiny_bundle.bundle / "model.onnx"), load_external_data=False)
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in model.graph.input}
    inits = {i.name: list(i.dims) for i in model.graph.initializer}
    for inp in manifest.lora_inputs:
        assert inputs[inp.name] == ([inp.dim, "lora_r"] if inp.part == "A" else ["lora_r", inp.dim])
        assert inits[inp.name] == list(inp.shape(0))  # the default is rank 0: the base model exactly
    assert (tiny_bundle.bundle / "genai_config.json").is_file() and (tiny_bundle.bundle / "tokenizer.json").is_file()


def test_architectures_the_bundle_cannot_take_are_refused(tmp_path: Path) -> None:
    gpt2 = make_tiny_gpt2(tmp_path / "gpt2")
    with pytest.raises(ExportError, match="GPT2LMHeadModel has no runtime bundle export"):
        export_bundle(gpt2, tmp_path / "out1", BundleSettings(targets=("c_attn",)), base_model_id="gpt2")
    # A linear layer as wide as the vocabulary would be taken for the LM head by the builder.
    wide = make_tiny_llama(tmp_path / "wide", hidden=256)  # intermediate 512 == vocab 512
    with pytest.raises(ExportError, match="as wide as the vocabulary"):
        export_bundle(wide, tmp_path / "out2", BundleSettings(), base_model_id="wide")
    llama = make_tiny_llama(tmp_path / "llama")
    with pytest.raises(ExportError, match=r"LoRA targets \['lm_head'\]"):
        export_bundle(llama, tmp_path / "out3", BundleSettings(targets=("lm_head",)), base_model_id="x")
    assert not any((tmp_path / f"out{i}").exists() for i in (1, 2, 3))


@pytest.mark.slow
def test_int4_export_quantizes_the_base_but_not_the_lora_inputs(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    import onnx

    from adapters_store.onnx_adapter import FORM_NAME, convert_adapter
    from agent.ort_runtime import OrtRuntime

    manifest = export_bundle(tiny_bundle.base, tmp_path / "int4", BundleSettings(), base_model_id="tiny")
    model = onnx.load(str(tmp_path / "int4" / "model.onnx"), load_external_data=False)
    ops = {n.op_type for n in model.graph.node}
    assert "MatMulNBits" in ops
    lora = {i.name: i.data_type for i in model.graph.initializer if ".lora_" in i.name}
    assert len(lora) == len(manifest.lora_inputs) and set(lora.values()) == {onnx.TensorProto.FLOAT}
    (tmp_path / "alpha").mkdir()
    convert_adapter(tiny_bundle.blobs["alpha"], manifest, tmp_path / "alpha" / FORM_NAME)
    with OrtRuntime(tmp_path / "int4") as rt:
        rt.load("alpha", tmp_path / "alpha")
        base = rt.generate("hello world", max_new_tokens=8, adapter=None).token_ids
        adapted = rt.generate("hello world", max_new_tokens=8, adapter="alpha").token_ids
    assert len(base) == len(adapted) == 8 and base != adapted


def _code(call, *args, **kw):  # type: ignore[no-untyped-def]
    try:
        return call(*args, **kw), grpc.StatusCode.OK, ""
    except grpc.RpcError as exc:
        return None, exc.code(), exc.details()


def _complete(srv: ServerThread, md, device: str, blob_for, tmp: Path) -> apb.CompleteJobResponse:  # type: ignore[no-untyped-def]
    spec = tpb.TrainingSpec(adapter_name="persona", base_model_id="tiny", dataset="d")
    srv.operator.SubmitJob(opb.SubmitJobRequest(device_id=device, training=spec), metadata=op_md())
    a = srv.agent.LeaseJob(apb.LeaseJobRequest(device_id=device), metadata=md).assignment
    blob = tmp / f"{a.job_id}.safetensors"
    info = blob_for(blob, a)
    upload_to_url(a.upload_url, blob)
    req = apb.CompleteJobRequest(job_id=a.job_id, lease_epoch=a.lease_epoch, sha256=info.sha256, size_bytes=info.size)
    done: apb.CompleteJobResponse = srv.agent.CompleteJob(req, metadata=md)
    return done


def test_devices_get_the_bundle_and_adapter_forms_once_made(tiny_bundle: TinyBundle, tmp_path: Path) -> None:
    bases = {"tiny": str(tiny_bundle.base)}
    with ServerThread(tmp_path / "orch", runtime_bases=bases, bundle_precision="fp32") as srv:
        caps = tpb.Capabilities(base_model_id="tiny", ram_bytes=8 * 2**30, inference_runtimes=[ONNX])
        reply = srv.agent.Enroll(apb.EnrollRequest(device_id="p1", capabilities=caps), metadata=op_md(ENROLL_TOKEN))
        md = dev_md("p1", reply.device_credential)
        device = srv.operator.GetDevice(opb.GetDeviceRequest(device_id="p1"), metadata=op_md()).device
        assert list(device.capabilities.inference_runtimes) == [ONNX]
        fingerprint = model_fingerprint(tiny_bundle.base)
        ask = apb.GetRuntimeBundleUrlRequest(runtime=ONNX, base_fingerprint=fingerprint)

        # The first ask starts the export and is told to come back.
        _, code, details = _code(srv.agent.GetRuntimeBundleUrl, ask, metadata=md)
        assert code == grpc.StatusCode.UNAVAILABLE and "being exported" in details
        got = wait_for(lambda: _code(srv.agent.GetRuntimeBundleUrl, ask, metadata=md)[0], 180, "the export")
        tar = tmp_path / "bundle.tar"
        download_from_url(got.url, tar, expected_sha256=got.sha256, expected_size=got.size_bytes)
        manifest = unpack_bundle(tar, tmp_path / "bundle")
        assert manifest.to_json() == got.manifest_json and manifest.base_fingerprint == fingerprint
        assert srv.store.hash_object(f"runtimes/onnx/sha256/{got.sha256}.tar").sha256 == got.sha256

        for bad, want in [
            (apb.GetRuntimeBundleUrlRequest(runtime=ONNX, base_fingerprint="sha256:" + "ab" * 32), "NOT_FOUND"),
            (apb.GetRuntimeBundleUrlRequest(runtime=ONNX, base_fingerprint="nope"), "INVALID_ARGUMENT"),
            (
                apb.GetRuntimeBundleUrlRequest(runtime=tpb.INFERENCE_RUNTIME_TORCH, base_fingerprint=fingerprint),
                "INVALID_ARGUMENT",
            ),
        ]:
            assert _code(srv.agent.GetRuntimeBundleUrl, bad, metadata=md)[1].name == want

        # A verified adapter is converted after its job completes; the form matches the bundle.
        def good(blob: Path, a: apb.Assignment):  # type: ignore[no-untyped-def]
            return pack_lora(
                tiny_bundle.peft["alpha"], tiny_bundle.base, blob, device_id="p1", job_id=a.job_id, attempt=a.attempt
            )

        done = _complete(srv, md, "p1", good, tmp_path)
        form_req = apb.GetAdapterDownloadUrlRequest(
            adapter_id=done.adapter.adapter_id, form=apb.ADAPTER_FORM_ONNX_ADAPTER
        )
        got_form = wait_for(lambda: _code(srv.agent.GetAdapterDownloadUrl, form_req, metadata=md)[0], 60, "the form")
        form = got_form.runtime_form
        assert form.bundle_sha256 == got.sha256 and got_form.adapter.sha256 == done.adapter.sha256
        assert json.loads(form.manifest_json)["rank"] == 8
        download_from_url(
            got_form.url, tmp_path / "a.onnx_adapter", expected_sha256=form.sha256, expected_size=form.size_bytes
        )
        import onnxruntime as ort

        params = ort.AdapterFormat.read_adapter(str(tmp_path / "a.onnx_adapter")).get_parameters()
        assert check_form({k: tuple(v.shape()) for k, v in params.items()}, manifest) == 8
        plain = srv.agent.GetAdapterDownloadUrl(
            apb.GetAdapterDownloadUrlRequest(adapter_id=done.adapter.adapter_id), metadata=md
        )
        assert not plain.HasField("runtime_form") and plain.adapter.sha256 == done.adapter.sha256

        # An adapter the bundle cannot serve is refused with the reason, every time it is asked.
        mlp = make_lora(tiny_bundle.base, tmp_path / "mlp", seed=5, targets=("q_proj", "up_proj"))

        def bad(blob: Path, a: apb.Assignment):  # type: ignore[no-untyped-def]
            return pack_lora(mlp, tiny_bundle.base, blob, device_id="p1", job_id=a.job_id, attempt=a.attempt)

        refused = _complete(srv, md, "p1", bad, tmp_path)
        req = apb.GetAdapterDownloadUrlRequest(
            adapter_id=refused.adapter.adapter_id, form=apb.ADAPTER_FORM_ONNX_ADAPTER
        )
        wait_for(
            lambda: _code(srv.agent.GetAdapterDownloadUrl, req, metadata=md)[1] != grpc.StatusCode.UNAVAILABLE,
            60,
            "the refusal",
        )
        _, code, details = _code(srv.agent.GetAdapterDownloadUrl, req, metadata=md)
        assert code == grpc.StatusCode.FAILED_PRECONDITION and "no LoRA input" in details and "up_proj" in details


def test_an_orchestrator_without_bases_has_no_bundles(tmp_path: Path) -> None:
    with ServerThread(tmp_path) as srv:
        reply = srv.agent.Enroll(
            apb.EnrollRequest(device_id="p1", capabilities=tpb.Capabilities()), metadata=op_md(ENROLL_TOKEN)
        )
        md = dev_md("p1", reply.device_credential)
        ask = apb.GetRuntimeBundleUrlRequest(runtime=ONNX, base_fingerprint="sha256:" + "ab" * 32)
        _, code, details = _code(srv.agent.GetRuntimeBundleUrl, ask, metadata=md)
        assert code == grpc.StatusCode.NOT_FOUND and "--runtime-base" in details
        _, code, _ = _code(srv.agent.GetRuntimeBundleUrl, ask)  # and strangers learn nothing
        assert code == grpc.StatusCode.UNAUTHENTICATED
