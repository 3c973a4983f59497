"""Transport security: one typed TLS setting shared by the orchestrator, the agent and the CLI.

`TlsConfig` holds PEM bytes read once from files (`load_tls`), so it pickles into Ray actors and
no later step reads a file that may have changed or vanished. Its three fields mean the same on
both ends of a connection:

    cert, key   this end's certificate chain and private key (a server's, or a client
                certificate for mutual TLS)
    ca          who vouches for the other end: a client verifies the server against it (None:
                the system's roots); a server given one requires every client to present a
                certificate signed by it (mTLS)

A device certificate names its device in its subject CN or in a SAN URI
`pocketlora-device:<id>`; `certified_names` reads those from a verified peer, and the
orchestrator's identity module refuses a call whose device header is not among them.

Errors are `TlsConfigError`, one line naming the flag and the file.
"""

from __future__ import annotations

import ipaddress
import logging
import ssl
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc

log = logging.getLogger("pocketlora.tls")

DEVICE_URI_PREFIX = "pocketlora-device:"
# Certificates and keys are small; a bigger file is a wrong path (a log, a disk image).
_MAX_PEM_BYTES = 1 << 20


class TlsConfigError(ValueError):
    """A TLS file or flag combination is unusable; the message names the flag and the file."""


@dataclass(frozen=True)
class TlsConfig:
    """PEM material for one end of a TLS connection (see the module docstring)."""

    cert: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise TlsConfigError("a certificate and its private key must be given together")

    def server_credentials(self) -> grpc.ServerCredentials:
        """Credentials for a gRPC server; with `ca`, clients must present a certificate it signed."""
        if self.cert is None or self.key is None:
            raise TlsConfigError("a TLS server needs a certificate and a private key (--tls-cert, --tls-key)")
        return grpc.ssl_server_credentials(
            [(self.key, self.cert)], root_certificates=self.ca, require_client_auth=self.ca is not None
        )

    def channel_credentials(self) -> grpc.ChannelCredentials:
        """Credentials for a gRPC client: verify the server against `ca`, present `cert` if any."""
        return grpc.ssl_channel_credentials(
            root_certificates=self.ca, private_key=self.key, certificate_chain=self.cert
        )

    def ssl_context(self) -> ssl.SSLContext:
        """An https client context (presigned URL transfers): the system's roots plus `ca`,
        hostname checks on."""
        context = ssl.create_default_context()
        if self.ca is not None:
            context.load_verify_locations(cadata=self.ca.decode("ascii", errors="replace"))
        return context


def open_channel(address: str, tls: TlsConfig | None, options: Sequence[tuple[str, Any]] = ()) -> grpc.Channel:
    """A channel to `address`: TLS when `tls` is given, else plaintext."""
    if tls is None:
        return grpc.insecure_channel(address, options=list(options))
    return grpc.secure_channel(address, tls.channel_credentials(), options=list(options))


# ---------------------------------------------------------------------------- loading
def _read_pem(path: Path, flag: str, marker: bytes) -> bytes:
    """The file's bytes, checked to hold a PEM block of `marker` ("CERTIFICATE", "PRIVATE KEY")."""
    try:
        if path.stat().st_size > _MAX_PEM_BYTES:
            raise TlsConfigError(f"{flag} {path}: larger than {_MAX_PEM_BYTES} bytes; not a PEM file")
        data = path.read_bytes()
    except FileNotFoundError:
        raise TlsConfigError(f"{flag} {path}: no such file") from None
    except IsADirectoryError:
        raise TlsConfigError(f"{flag} {path}: is a directory, not a PEM file") from None
    except PermissionError:
        raise TlsConfigError(f"{flag} {path}: not readable by this user") from None
    except OSError as exc:
        raise TlsConfigError(f"{flag} {path}: cannot read ({exc.strerror})") from None
    if b"-----BEGIN " not in data or marker not in data:
        kind = marker.decode().lower()
        raise TlsConfigError(f"{flag} {path}: no PEM {kind} in it")
    return data


def _check_pair(cert: Path, key: Path, cert_flag: str, key_flag: str) -> None:
    """Refuse a certificate and key that do not belong together (or that OpenSSL cannot parse)."""
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_cert_chain(cert, key)
    except ssl.SSLError as exc:
        reason = exc.reason or str(exc)
        if "KEY_VALUES_MISMATCH" in reason or "key values mismatch" in str(exc):
            raise TlsConfigError(f"{key_flag} {key} is not the private key of {cert_flag} {cert}") from None
        raise TlsConfigError(
            f"{cert_flag} {cert} / {key_flag} {key}: not a usable certificate and key ({reason})"
        ) from None


def _check_ca(data: bytes, path: Path, flag: str) -> None:
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cadata=data.decode("ascii"))
    except (ssl.SSLError, UnicodeDecodeError, ValueError) as exc:
        raise TlsConfigError(f"{flag} {path}: not a usable CA certificate ({type(exc).__name__})") from None


def load_tls(
    *,
    cert: Path | None = None,
    key: Path | None = None,
    ca: Path | None = None,
    ca_flag: str = "--tls-ca",
    cert_flag: str = "--tls-cert",
    key_flag: str = "--tls-key",
) -> TlsConfig | None:
    """Read and check the TLS files the flags name, once; None when no flag is given."""
    if cert is None and key is None and ca is None:
        return None
    if (cert is None) != (key is None):
        given, missing = (cert_flag, key_flag) if key is None else (key_flag, cert_flag)
        raise TlsConfigError(f"{given} needs {missing} (a certificate and its private key go together)")
    cert_pem = key_pem = ca_pem = None
    if cert is not None and key is not None:
        cert_pem = _read_pem(cert, cert_flag, b"CERTIFICATE")
        key_pem = _read_pem(key, key_flag, b"PRIVATE KEY")
        _check_pair(cert, key, cert_flag, key_flag)
        if key.stat().st_mode & 0o077:
            log.warning("%s %s is readable by other users; chmod 600 it", key_flag, key)
    if ca is not None:
        ca_pem = _read_pem(ca, ca_flag, b"CERTIFICATE")
        _check_ca(ca_pem, ca, ca_flag)
    return TlsConfig(cert=cert_pem, key=key_pem, ca=ca_pem)


def load_server_tls(cert: Path | None, key: Path | None, client_ca: Path | None) -> TlsConfig | None:
    """The server's TLS from `--tls-cert/--tls-key[/--tls-client-ca]`; None without them."""
    if client_ca is not None and cert is None and key is None:
        raise TlsConfigError("--tls-client-ca needs --tls-cert and --tls-key (mutual TLS runs over TLS)")
    return load_tls(cert=cert, key=key, ca=client_ca, ca_flag="--tls-client-ca")


# ---------------------------------------------------------------------------- listening
def is_loopback(host: str) -> bool:
    """True for a host that only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_listen(listen: str, tls: TlsConfig | None, insecure: bool) -> None:
    """Refuse plaintext on an address beyond this machine unless `insecure`; then warn loudly."""
    host = listen.rpartition(":")[0]
    if tls is not None or is_loopback(host):
        return
    if not insecure:
        raise TlsConfigError(
            f"--listen {listen}: refusing to serve plaintext gRPC beyond this machine; "
            "give --tls-cert and --tls-key, or --insecure to accept that credentials and data travel in clear"
        )
    log.warning(
        "INSECURE: serving plaintext gRPC on %s; device credentials, operator tokens and datasets "
        "travel unencrypted and unauthenticated (--insecure)",
        listen,
    )


# ---------------------------------------------------------------------------- peers
def certified_names(auth_context: Mapping[str, Iterable[bytes]]) -> tuple[str, ...] | None:
    """The device ids a verified client certificate vouches for (its CN and its
    `pocketlora-device:` SAN URIs); None when the peer presented no certificate."""
    if b"ssl" not in list(auth_context.get("transport_security_type", ())):
        return None
    if not list(auth_context.get("x509_pem_cert", ())):
        return None
    names = [v.decode(errors="replace") for v in auth_context.get("x509_common_name", ())]
    for uri in auth_context.get("peer_uri", ()):
        text = uri.decode(errors="replace")
        if text.startswith(DEVICE_URI_PREFIX):
            names.append(text.removeprefix(DEVICE_URI_PREFIX))
    return tuple(dict.fromkeys(n for n in names if n))


def describe_failure(details: str, tls: TlsConfig | None) -> str | None:
    """A plain sentence for a connection failure that TLS explains (from a gRPC status's
    details and the client's own settings); None when TLS does not explain it."""
    text = details.lower()
    if "certificate_verify_failed" in text or "certificate verify failed" in text:
        return "its certificate is not trusted (pass --tls-ca with the CA that signed it)"
    if "wrong_version_number" in text:
        return "it does not speak TLS on this port (drop the --tls-* options, or check the port)"
    if "handshake" in text and ("ssl" in text or "tls" in text):
        return "the TLS handshake failed (check --tls-ca, --tls-cert and --tls-key)"
    if "socket closed" in text:
        # A TLS server closes the connection at once on a plaintext hello, and a mutual-TLS
        # server on a client that presents no certificate (or one its CA did not sign).
        if tls is None:
            return "it closed the connection at once: it may serve TLS only (pass --tls-ca)"
        if tls.cert is None:
            return "it closed the connection during the TLS handshake: it may require a client certificate (pass --tls-cert and --tls-key)"
        return "it closed the connection during the TLS handshake: it may not accept this client certificate"
    return None
