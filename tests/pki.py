"""A throwaway certificate authority for TLS tests, made with the ``openssl`` command line:
a CA, a server certificate it signed (for the name ``localhost`` only), and a second,
unrelated CA that must not be trusted."""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

SERVER_NAME = "localhost"
# EC keys: generated in milliseconds, where RSA takes a noticeable share of the test.
_NEW_KEY = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")


@dataclass(frozen=True)
class Pki:
    ca: Path
    other_ca: Path
    server_cert: Path
    server_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


def _ca(directory: Path, name: str) -> tuple[Path, Path]:
    key, cert = directory / f"{name}.key", directory / f"{name}.pem"
    _openssl(
        "req", "-x509", *_NEW_KEY, "-days", "2",
        "-subj", f"/CN={name}", "-keyout", key.name, "-out", cert.name,
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=directory,
    )  # fmt: skip
    return key, cert


def make_pki(directory: Path) -> Pki:
    """Write the CA, the other CA and a server key and certificate into ``directory``."""
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make test certificates")
    ca_key, ca = _ca(directory, "test-ca")
    _, other_ca = _ca(directory, "other-ca")
    ext = directory / "server.ext"
    ext.write_text(
        f"subjectAltName=DNS:{SERVER_NAME}\n"
        "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n"
        "extendedKeyUsage=serverAuth\n"
    )
    _openssl(
        "req", *_NEW_KEY, "-subj", f"/CN={SERVER_NAME}",
        "-keyout", "server.key", "-out", "server.csr", cwd=directory,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", "server.csr", "-CA", ca.name, "-CAkey", ca_key.name,
        "-CAcreateserial", "-days", "2", "-extfile", ext.name, "-out", "server.pem",
        cwd=directory,
    )  # fmt: skip
    return Pki(ca, other_ca, directory / "server.pem", directory / "server.key")
