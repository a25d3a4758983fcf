"""Inside an image: no file holds the build's CA bundle or one of the certificates it adds to Debian's roots.

Reads ``/probe-data/egress.json`` (``{"bundle_size", "bundle_sha256", "certificates"}``:
base64 bodies). Walks the image's files (skipping ``/proc``, ``/sys``, ``/dev`` and the
probe mounts); hashes every file of the bundle's size; searches every file that looks
like a certificate store (``.pem``, ``.crt``, ``.cer``, ``.cert``, anything under
``/etc/ssl`` or ``/run/secrets``) for the certificates. Prints one JSON object:
``scanned`` (files), ``stores`` (certificate stores read), ``found`` (offending paths).
"""

import hashlib
import json
import os

data = json.load(open("/probe-data/egress.json"))
skip = ("/proc", "/sys", "/dev", "/probe-data", "/probes")
found, scanned, stores = [], 0, 0
for top, dirs, files in os.walk("/"):
    dirs[:] = [d for d in dirs if os.path.join(top, d) not in skip]
    for name in files:
        path = os.path.join(top, name)
        try:
            if os.path.islink(path) or not os.path.isfile(path):
                continue
            size = os.path.getsize(path)
            scanned += 1
            if size == data["bundle_size"]:
                with open(path, "rb") as fh:
                    if hashlib.sha256(fh.read()).hexdigest() == data["bundle_sha256"]:
                        found.append(path)
            if name.endswith((".pem", ".crt", ".cer", ".cert")) or top.startswith(("/etc/ssl", "/run/secrets")):
                stores += 1
                with open(path, "rb") as fh:
                    text = "".join(fh.read().decode(errors="replace").split())
                if any(cert in text for cert in data["certificates"]):
                    found.append(path)
        except OSError:
            continue
print(json.dumps({"scanned": scanned, "stores": stores, "found": sorted(set(found))}))
