"""A throw-away PKI made at test time with the ``openssl`` command: CA, server and client."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True, kw_only=True)
class Pair:
    """A certificate and its private key (PEM files)."""

    certificate: Path
    private_key: Path


def _openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=30)


def make_ca(folder: Path, name: str) -> Pair:
    """A self-signed CA certificate (EC P-256, valid one day)."""
    folder.mkdir(parents=True, exist_ok=True)
    pair = Pair(certificate=folder / f"{name}.pem", private_key=folder / f"{name}.key")
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", pair.private_key, "-out", pair.certificate, "-days", "1",
        "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
    )  # fmt: skip
    return pair


def issue(ca: Pair, folder: Path, name: str, *, ip: str = "127.0.0.1") -> Pair:
    """A leaf certificate for ``name`` signed by ``ca``, usable as TLS server and client."""
    pair = Pair(certificate=folder / f"{name}.pem", private_key=folder / f"{name}.key")
    csr = folder / f"{name}.csr"
    ext = folder / f"{name}.ext"
    ext.write_text(
        f"subjectAltName=IP:{ip},DNS:localhost\n"
        "basicConstraints=critical,CA:FALSE\n"
        "keyUsage=critical,digitalSignature,keyAgreement\n"
        "extendedKeyUsage=serverAuth,clientAuth\n",
        encoding="ascii",
    )
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
        "-keyout", pair.private_key, "-out", csr, "-subj", f"/CN={name}",
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", csr, "-CA", ca.certificate, "-CAkey", ca.private_key,
        "-CAcreateserial", "-out", pair.certificate, "-days", "1", "-extfile", ext,
    )  # fmt: skip
    return pair
