"""Adapter blobs and manifests: packing, storage backends, presigned transfers, verification.

Torch-free: the orchestrator and an idle agent import this package.
"""

from adapters_store.base import BlobStore, UploadTarget
from adapters_store.blob import (
    BlobInfo,
    ensure_safetensors,
    pack_adapter,
    read_blob_manifest,
    sha256_file,
    unpack_adapter,
)
from adapters_store.errors import (
    AdapterFormatError,
    BlobNotFound,
    IntegrityError,
    InvalidKey,
    StoreConfigError,
    StoreError,
    StoreUnavailable,
    TransferError,
)
from adapters_store.fingerprint import model_fingerprint, read_safetensors_header
from adapters_store.fs import FileBlobStore
from adapters_store.gc import collect_garbage
from adapters_store.keys import blob_key, dataset_key, upload_key, validate_key
from adapters_store.manifest import AdapterManifest
from adapters_store.s3 import S3BlobStore
from adapters_store.transfer import download_from_url, upload_to_url
from adapters_store.url import open_store
from adapters_store.verify import promote_upload, verify_and_promote, verify_upload

__all__ = [
    "AdapterFormatError",
    "AdapterManifest",
    "BlobInfo",
    "BlobNotFound",
    "BlobStore",
    "FileBlobStore",
    "IntegrityError",
    "InvalidKey",
    "S3BlobStore",
    "StoreConfigError",
    "StoreError",
    "StoreUnavailable",
    "TransferError",
    "UploadTarget",
    "blob_key",
    "collect_garbage",
    "dataset_key",
    "download_from_url",
    "ensure_safetensors",
    "model_fingerprint",
    "open_store",
    "pack_adapter",
    "promote_upload",
    "read_blob_manifest",
    "read_safetensors_header",
    "sha256_file",
    "unpack_adapter",
    "upload_key",
    "upload_to_url",
    "validate_key",
    "verify_and_promote",
    "verify_upload",
]
