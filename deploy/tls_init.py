#!/usr/bin/env python3
"""``fedrot-tls-init``: a private CA and a server certificate for the gRPC port, made once.

    fedrot-tls-init --authority-dir DIR --server-dir DIR [--ca-dir DIR]... \\
                    --names server,localhost,127.0.0.1[,fed.example.org] [--owner UID:GID]

- ``--authority-dir``: ``ca.key`` and ``ca.pem``, the CA (EC P-256, 10 years). Made when
  missing, kept afterwards; only this command should see the folder.
- ``--server-dir``: ``server.key``, ``server.pem`` (EC P-256, signed by the CA, 825 days; its
  subject alternative names are ``--names``: DNS names, and IP addresses as IP entries) and
  ``ca.pem`` (for the server's own health check): ``FEDROT_SERVER_TLS_KEY_FILE``,
  ``FEDROT_SERVER_TLS_CERT_FILE``, ``FEDROT_HEALTHCHECK_TLS_CA_FILE``.
- each ``--ca-dir``: ``ca.pem`` alone, the clients' ``FEDROT_CLIENT_TLS_CA_FILE``.

The server certificate is issued again (same CA, so clients keep trusting it) when it is
missing, was not signed by the CA, lacks one of ``--names``, or expires within 30 days; else
nothing changes. Keys are mode 0400, certificates 0444; run as root, ``--owner`` makes the files
that user's (the images run as 10001). Blank names are skipped, so ``--names`` may end in an
unset variable. Needs the ``openssl`` command (the python:3.11-slim images carry it, through
ca-certificates).
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

CA_DAYS, SERVER_DAYS = 3650, 825
RENEW_BEFORE_S = 30 * 24 * 3600
DNS_NAME = re.compile(r"(?=.{1,253}$)[A-Za-z0-9*]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9-]+)*")
KEY_MODE, CERT_MODE = 0o400, 0o444
EXIT_OK, EXIT_ERROR = 0, 2

CA_CONFIG = """[req]
distinguished_name = dn
prompt = no
x509_extensions = v3_ca
[dn]
CN = fedrot federation CA
[v3_ca]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""

SERVER_CONFIG = """[req]
distinguished_name = dn
prompt = no
[dn]
CN = {common_name}
[v3_server]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = {alt_names}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


class TlsInitError(Exception):
    """openssl failed or an argument is bad; the message says which."""


def subject_alt_names(names: Sequence[str]) -> list[str]:
    """OpenSSL ``subjectAltName`` entries (``DNS:x``, ``IP:1.2.3.4``) for ``names``."""
    entries = []
    for name in names:
        try:
            entries.append(f"IP:{ipaddress.ip_address(name)}")
        except ValueError:
            if not DNS_NAME.fullmatch(name):
                raise TlsInitError(f"--names: {name!r} is neither a DNS name nor an IP address")
            entries.append(f"DNS:{name}")
    return entries


def openssl(*args: str) -> str:
    """Run ``openssl args``; its output, or TlsInitError with its error text."""
    program = shutil.which("openssl")
    if program is None:
        raise TlsInitError("the openssl command is not installed")
    done = subprocess.run([program, *args], capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise TlsInitError(f"openssl {args[0]} failed: {done.stderr.strip()}")
    return done.stdout


def new_key(path: Path) -> None:
    openssl("genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256", "-out", str(path))


def make_authority(scratch: Path) -> tuple[Path, Path]:
    """A new CA key and self-signed certificate in ``scratch``."""
    key, cert, config = scratch / "ca.key", scratch / "ca.pem", scratch / "ca.cnf"
    config.write_text(CA_CONFIG)
    new_key(key)
    openssl("req", "-x509", "-new", "-config", str(config), "-key", str(key), "-sha256",
            "-days", str(CA_DAYS), "-out", str(cert))  # fmt: skip
    return key, cert


def issue_server(
    scratch: Path, ca_key: Path, ca_cert: Path, entries: Sequence[str]
) -> tuple[Path, Path]:
    """A new server key and certificate signed by the CA, for SAN ``entries``, in ``scratch``."""
    key, csr, cert = scratch / "server.key", scratch / "server.csr", scratch / "server.pem"
    config = scratch / "server.cnf"
    common_name = entries[0].split(":", 1)[1]
    config.write_text(SERVER_CONFIG.format(common_name=common_name, alt_names=", ".join(entries)))
    new_key(key)
    openssl("req", "-new", "-config", str(config), "-key", str(key), "-out", str(csr))
    openssl("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key),
            "-set_serial", f"0x{secrets.token_hex(16)}", "-days", str(SERVER_DAYS), "-sha256",
            "-extfile", str(config), "-extensions", "v3_server", "-out", str(cert))  # fmt: skip
    return key, cert


def certificate_names(cert: Path) -> set[str]:
    """The subject alternative names of ``cert`` as ``DNS:x`` / ``IP:x`` entries."""
    text = openssl("x509", "-in", str(cert), "-noout", "-ext", "subjectAltName")
    found = re.findall(r"(DNS|IP Address):([^,\s]+)", text)
    return {f"{'IP' if kind != 'DNS' else 'DNS'}:{value}" for kind, value in found}


def server_certificate_fits(server_dir: Path, ca_cert: Path, entries: Sequence[str]) -> bool:
    """True when ``server_dir`` holds a key and a certificate that the CA signed, naming every
    entry, valid for 30 more days."""
    cert, key = server_dir / "server.pem", server_dir / "server.key"
    if not (cert.exists() and key.exists()):
        return False
    try:
        openssl("verify", "-CAfile", str(ca_cert), str(cert))
        openssl("x509", "-in", str(cert), "-noout", "-checkend", str(RENEW_BEFORE_S))
    except TlsInitError:
        return False
    return set(entries) <= certificate_names(cert)


def install(source: Path, target: Path, mode: int, owner: tuple[int, int] | None) -> None:
    """Copy ``source`` to ``target`` atomically with ``mode`` (and ``owner`` when root)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = target.with_name(f".{target.name}.{secrets.token_hex(4)}.tmp")
    shutil.copyfile(source, scratch)
    os.chmod(scratch, mode)
    if owner is not None and os.geteuid() == 0:
        os.chown(scratch, *owner)
    os.replace(scratch, target)


def initialise(
    authority: Path, server_dir: Path, ca_dirs: Sequence[Path], names: Sequence[str],
    owner: tuple[int, int] | None,
) -> list[str]:  # fmt: skip
    """Make or keep the CA and the server certificate (see the module docstring); one report
    line per decision."""
    entries = subject_alt_names([n.strip() for n in names if n.strip()])
    if not entries:
        raise TlsInitError("--names: no name for the server certificate")
    report = []
    with tempfile.TemporaryDirectory(prefix="fedrot-tls-") as folder:
        scratch = Path(folder)
        ca_key, ca_cert = authority / "ca.key", authority / "ca.pem"
        if not (ca_key.exists() and ca_cert.exists()):
            made_key, made_cert = make_authority(scratch)
            install(made_key, ca_key, KEY_MODE, owner)
            install(made_cert, ca_cert, CERT_MODE, owner)
            report.append(f"{ca_cert}: new CA")
        if server_certificate_fits(server_dir, ca_cert, entries):
            report.append(f"{server_dir / 'server.pem'}: kept")
        else:
            key, cert = issue_server(scratch, ca_key, ca_cert, entries)
            install(key, server_dir / "server.key", KEY_MODE, owner)
            install(cert, server_dir / "server.pem", CERT_MODE, owner)
            report.append(f"{server_dir / 'server.pem'}: issued for {', '.join(entries)}")
        for folder_of_ca in (server_dir, *ca_dirs):
            install(ca_cert, folder_of_ca / "ca.pem", CERT_MODE, owner)
    return report


def parse_owner(text: str) -> tuple[int, int]:
    """argparse type of ``--owner``: ``UID:GID`` (numbers)."""
    uid, sep, gid = text.partition(":")
    if not (sep and uid.isdigit() and gid.isdigit()):
        raise argparse.ArgumentTypeError(f"--owner must be UID:GID (numbers), got {text!r}")
    return int(uid), int(gid)


def parse_arguments(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="fedrot-tls-init",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--authority-dir", type=Path, required=True, help="ca.key, ca.pem")
    parser.add_argument("--server-dir", type=Path, required=True, help="server.key/.pem, ca.pem")
    parser.add_argument("--ca-dir", type=Path, action="append", default=[], help="ca.pem only")
    parser.add_argument("--names", required=True, help="comma-separated DNS names and IPs")
    parser.add_argument("--owner", type=parse_owner, help="UID:GID of the files (when root)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_arguments(sys.argv[1:] if argv is None else argv)
    try:
        report = initialise(args.authority_dir, args.server_dir, args.ca_dir,
                            args.names.split(","), args.owner)  # fmt: skip
    except (TlsInitError, OSError) as exc:
        print(f"fedrot-tls-init: {exc}", file=sys.stderr)
        return EXIT_ERROR
    for line in report:
        print(f"fedrot-tls-init: {line}")
    return EXIT_OK


if __name__ == "__main__":
    raise SystemExit(main())
