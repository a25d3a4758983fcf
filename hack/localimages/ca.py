"""The machine's CA bundle, passed to image builds as the build secret ``egress-ca``.

Where outbound HTTPS goes through an intercepting proxy, the machine's trust bundle
(``/etc/ssl/certs/ca-certificates.crt`` on Debian) holds the proxy's CA next to the
public roots; pip (``PIP_CERT``) and uv (``SSL_CERT_FILE``) inside a build need that
whole bundle. It is a build secret (``--secret id=egress-ca,src=FILE``): mounted at
``/run/secrets/egress-ca`` for the ``RUN`` steps that ask for it, never in a layer.

:func:`extra_certificates` names what the bundle adds to Debian's stock roots (the
tests assert that none of it ends up in an image).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

#: The host bundle unless ``QLORA_EGRESS_CA`` names another file.
DEFAULT_BUNDLE = Path("/etc/ssl/certs/ca-certificates.crt")
#: Debian's stock roots (package ca-certificates), one PEM file each.
STOCK_DIR = Path("/usr/share/ca-certificates/mozilla")
_PEM = re.compile(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", re.S)


def host_bundle() -> Path | None:
    """The CA bundle to pass as the ``egress-ca`` secret, or ``None`` when there is none.

    Raises:
        FileNotFoundError: ``QLORA_EGRESS_CA`` names a file that does not exist.
    """
    named = os.environ.get("QLORA_EGRESS_CA")
    if named:
        path = Path(named)
        if not path.is_file():
            raise FileNotFoundError(f"QLORA_EGRESS_CA={named}: no such file")
        return path.resolve()
    return DEFAULT_BUNDLE.resolve() if DEFAULT_BUNDLE.is_file() else None


def certificates(text: str) -> list[str]:
    """The base64 bodies (whitespace removed) of every PEM certificate in ``text``."""
    return ["".join(body.split()) for body in _PEM.findall(text)]


def extra_certificates(bundle: Path, stock_dir: Path = STOCK_DIR) -> list[str]:
    """Base64 bodies of the certificates in ``bundle`` that are not among Debian's stock roots.

    Raises:
        FileNotFoundError: ``bundle`` or ``stock_dir`` does not exist.
    """
    if not stock_dir.is_dir():
        raise FileNotFoundError(f"{stock_dir}: Debian's stock CA directory is missing (package ca-certificates)")
    stock = {cert for path in stock_dir.glob("*.crt") for cert in certificates(path.read_text(errors="replace"))}
    return [cert for cert in certificates(bundle.read_text(errors="replace")) if cert not in stock]
