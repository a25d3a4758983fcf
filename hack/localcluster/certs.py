"""The local cluster's PKI: one CA, serving and client certificates, service-account keys.

Keys are ECDSA P-256 (fast to generate; every component accepts them). Certificates
are valid for one year from an hour ago (tolerates small clock skew). Everything is
written as PEM files into one directory by :func:`write_pki`.
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

#: SANs of the apiserver's serving certificate (10.0.0.1 is the first IP of the
#: service CIDR 10.0.0.0/24: the ``kubernetes`` Service's cluster IP).
APISERVER_DNS = ("localhost", "kubernetes", "kubernetes.default", "kubernetes.default.svc",
                 "kubernetes.default.svc.cluster.local")
APISERVER_IPS = ("127.0.0.1", "10.0.0.1")
VALIDITY = dt.timedelta(days=365)


@dataclass(frozen=True)
class KeyPair:
    """A certificate and its private key as PEM bytes."""

    cert_pem: bytes
    key_pem: bytes


@dataclass(frozen=True)
class Pki:
    """Paths of the PEM files written by :func:`write_pki`.

    ``clients`` maps a role (``admin``, ``controller-manager``, ``scheduler``,
    ``apiserver-kubelet-client``, ``node:<name>``) to its (cert, key) paths. ``kubelet_*``
    is the kubelet's serving certificate (127.0.0.1, localhost, the node names, the node address).
    """

    directory: Path
    ca_cert: Path
    ca_key: Path
    apiserver_cert: Path
    apiserver_key: Path
    kubelet_cert: Path
    kubelet_key: Path
    sa_key: Path
    sa_pub: Path
    clients: dict[str, tuple[Path, Path]]


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _name(common_name: str, organizations: tuple[str, ...] = ()) -> x509.Name:
    attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, org) for org in organizations]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, common_name))
    return x509.Name(attrs)


def make_ca(common_name: str = "qlora-local-ca") -> tuple[KeyPair, ec.EllipticCurvePrivateKey, x509.Certificate]:
    """Create a self-signed CA. Returns its PEMs, its key object and its certificate object."""
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    name = _name(common_name)
    cert = (x509.CertificateBuilder()
            .subject_name(name).issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(hours=1))
            .not_valid_after(now + VALIDITY)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256()))
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)), key, cert


def issue(ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, common_name: str, *,
          organizations: tuple[str, ...] = (), dns_names: tuple[str, ...] = (),
          ip_addresses: tuple[str, ...] = (), server: bool = False, client: bool = True) -> KeyPair:
    """Issue a leaf certificate signed by the CA.

    ``organizations`` become the subject's O attributes (Kubernetes groups for client
    certificates); ``dns_names``/``ip_addresses`` the SANs. ``server``/``client`` pick
    the extended key usages.
    """
    key = _new_key()
    now = dt.datetime.now(dt.timezone.utc)
    usages = ([ExtendedKeyUsageOID.SERVER_AUTH] if server else []) + ([ExtendedKeyUsageOID.CLIENT_AUTH] if client else [])
    builder = (x509.CertificateBuilder()
               .subject_name(_name(common_name, organizations))
               .issuer_name(ca_cert.subject)
               .public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(hours=1))
               .not_valid_after(now + VALIDITY)
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False,
                                            content_commitment=False, data_encipherment=False,
                                            key_agreement=False, key_cert_sign=False, crl_sign=False,
                                            encipher_only=False, decipher_only=False), critical=True)
               .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
               .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                              critical=False))
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in dns_names]
    sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return KeyPair(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key))


def service_account_keys() -> KeyPair:
    """A service-account token signing key pair: (public key PEM, private key PEM) in a KeyPair."""
    key = _new_key()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM,
                                        serialization.PublicFormat.SubjectPublicKeyInfo)
    return KeyPair(pub, _key_pem(key))


def _write(path: Path, data: bytes, private: bool = False) -> Path:
    path.write_bytes(data)
    if private:
        path.chmod(0o600)
    return path


def write_pki(directory: Path, node_names: tuple[str, ...] = (), extra_ips: tuple[str, ...] = ()) -> Pki:
    """Generate the whole PKI into ``directory`` and return the file paths.

    Client identities: ``admin`` (CN=admin, O=system:masters), ``controller-manager``
    (CN=system:kube-controller-manager), ``scheduler`` (CN=system:kube-scheduler),
    ``apiserver-kubelet-client`` (the API server towards the kubelet) and,
    per node, ``node:<name>`` (CN=system:node:<name>, O=system:nodes), and ``kube-proxy``
    (CN=system:kube-proxy, bound to ``system:node-proxier`` by the default RBAC), and ``coredns``
    (CN=system:coredns: the real node's cluster DNS, bound to its read-only ClusterRole at start).
    ``extra_ips`` are added to the SANs of the API server's and the kubelet's serving
    certificates (the real node's address, where pods and the API server reach them).
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_cert = make_ca()
    ca_cert_path = _write(directory / "ca.crt", ca.cert_pem)
    ca_key_path = _write(directory / "ca.key", ca.key_pem, private=True)
    serving = issue(ca_key, ca_cert, "kube-apiserver", dns_names=APISERVER_DNS,
                    ip_addresses=APISERVER_IPS + tuple(extra_ips), server=True, client=False)
    api_cert = _write(directory / "apiserver.crt", serving.cert_pem)
    api_key = _write(directory / "apiserver.key", serving.key_pem, private=True)
    kubelet = issue(ca_key, ca_cert, "local-kubelet", dns_names=("localhost",) + tuple(node_names),
                    ip_addresses=("127.0.0.1",) + tuple(extra_ips), server=True, client=False)
    kubelet_cert = _write(directory / "kubelet.crt", kubelet.cert_pem)
    kubelet_key = _write(directory / "kubelet.key", kubelet.key_pem, private=True)
    sa = service_account_keys()
    sa_pub = _write(directory / "sa.pub", sa.cert_pem)
    sa_key = _write(directory / "sa.key", sa.key_pem, private=True)
    identities: dict[str, tuple[str, tuple[str, ...]]] = {
        "admin": ("admin", ("system:masters",)),
        "controller-manager": ("system:kube-controller-manager", ()),
        "scheduler": ("system:kube-scheduler", ()),
        "apiserver-kubelet-client": ("kube-apiserver-kubelet-client", ()),
        "kube-proxy": ("system:kube-proxy", ()),
        "coredns": ("system:coredns", ()),
    }
    for node in node_names:
        identities[f"node:{node}"] = (f"system:node:{node}", ("system:nodes",))
    clients: dict[str, tuple[Path, Path]] = {}
    for role, (cn, orgs) in identities.items():
        pair = issue(ca_key, ca_cert, cn, organizations=orgs)
        stem = role.replace(":", "-")
        clients[role] = (_write(directory / f"{stem}.crt", pair.cert_pem),
                         _write(directory / f"{stem}.key", pair.key_pem, private=True))
    return Pki(directory, ca_cert_path, ca_key_path, api_cert, api_key, kubelet_cert, kubelet_key, sa_key, sa_pub,
               clients)
