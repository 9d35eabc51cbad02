"""`fedtune certs`: the coordinator's TLS material of one federation.

Laid out as the Flower commands take it:

    OUT/ca.crt, OUT/ca.key                     the federation's CA (keep ca.key offline)
    OUT/superlink/server.pem, server.key       the SuperLink's certificate (SAN = --hosts) and key

No SuperNode key is made here: each institution makes its own with `fedtune node-keys` and sends
only the .pub, which the coordinator registers with `flwr supernode register`. So whoever holds
this folder cannot act as any institution's node. Private keys are written owner-only (0600),
certificates 0644. Each institution receives ca.crt, nothing else.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedtune.common.errors import FedtuneError
from fedtune.common.storage import atomic_write

PRIVATE, PUBLIC = 0o600, 0o644


@dataclass(frozen=True)
class FederationCredentials:
    ca_certificate: Path
    superlink_certificate: Path
    superlink_key: Path


def make_credentials(*, out: Path, hosts: list[str], days: int = 365) -> FederationCredentials:
    """A CA and a SuperLink certificate for `hosts` (names or IPs); SuperNode keys are the institutions'."""
    if not hosts:
        raise FedtuneError("--hosts needs at least one host name or IP the SuperNodes will dial")
    for host in hosts:
        if not _is_ip(host) and (":" in host or "[" in host or "/" in host or " " in host):
            raise FedtuneError(f"--hosts entry {host!r} is not a host name or IP address (no ports, brackets or "
                               f"schemes: e.g. coordinator.example.org,10.0.0.5,::1)")
    if days < 1:
        raise FedtuneError("--days must be at least 1")
    out = Path(out)
    if (out / "ca.key").exists():
        raise FedtuneError(f"{out} already holds a CA; choose another --out (or delete it on purpose)")
    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedtune federation CA")])
    ca_cert = (_builder(subject=ca_name, issuer=ca_name, key=ca_key.public_key(), now=now, days=days)
               .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
               .add_extension(_key_usage(cert_sign=True), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
               .sign(ca_key, hashes.SHA384()))
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (_builder(subject=x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]),
                            issuer=ca_name, key=server_key.public_key(), now=now, days=days)
                   .add_extension(x509.SubjectAlternativeName([_san(h) for h in _with_loopback(hosts)]), critical=False)
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(_key_usage(cert_sign=False), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
                   .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                                  critical=False)
                   .sign(ca_key, hashes.SHA384()))
    pem = serialization.Encoding.PEM
    _write(out / "ca.crt", ca_cert.public_bytes(pem), PUBLIC)
    _write(out / "ca.key", _private_pem(ca_key), PRIVATE)
    _write(out / "superlink" / "server.pem", server_cert.public_bytes(pem), PUBLIC)
    _write(out / "superlink" / "server.key", _private_pem(server_key), PRIVATE)
    return FederationCredentials(ca_certificate=out / "ca.crt", superlink_certificate=out / "superlink" / "server.pem",
                                 superlink_key=out / "superlink" / "server.key")


def _builder(*, subject: x509.Name, issuer: x509.Name, key, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (x509.CertificateBuilder().subject_name(subject).issuer_name(issuer).public_key(key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=days)))


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=True, key_cert_sign=cert_sign, crl_sign=cert_sign,
                         content_commitment=False, key_encipherment=False, data_encipherment=False,
                         key_agreement=not cert_sign, encipher_only=False, decipher_only=False)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        return x509.DNSName(host)


def _private_pem(key) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _write(path: Path, data: bytes, mode: int) -> None:
    """With the final mode from the first byte, so a private key is never world-readable."""
    atomic_write(path, data, mode=mode)


def _with_loopback(hosts: list[str]) -> list[str]:
    """The --hosts, and 127.0.0.1: the coordinator's own runtime (`fedtune run-superlink`) dials the
    SuperLink's one TLS port on loopback."""
    return hosts if "127.0.0.1" in hosts else [*hosts, "127.0.0.1"]
