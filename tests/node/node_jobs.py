"""QLoRAJobs for the tests on the real node: the stand-in trainer as a real pod's command and
the manifest with the pod resources that fit the node.

The stand-in trainer (:data:`NODE_COMMAND`) is ``operator_harness``'s program (``STAND_IN_LIB`` +
``FAKE_BEHAVIOURS``: config file, exit codes, JSON termination message, progress patches through
the ``kubernetes`` Service with the pod's own ServiceAccount token), run by the trainer image's
python as the operator's trainer command; it exits 143 on SIGTERM as ``qlora-train`` does (a
container's pid 1 has no default action for SIGTERM). The operator renders the same pods it
renders for users; only the command differs.
"""

from __future__ import annotations

import json

from operator_harness import FAKE_BEHAVIOURS, STAND_IN_LIB  # the stand-in trainer's program
from operator_harness import manifest as stand_in_manifest  # noqa: E402

#: What the stand-in trainer's pods request (requests = limits): four of them fit the node's
#: 2 cores at once; the memory limit is what the ``oom`` behaviour allocates past.
POD_RESOURCES = {"cpu": "200m", "memory": "256Mi"}
#: The stand-in trainer in a real pod (exit 143 on the kubelet's SIGTERM).
NODE_TRAINER = STAND_IN_LIB + r'''
signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(143))
'''
NODE_COMMAND = json.dumps(["python", "-c", NODE_TRAINER + FAKE_BEHAVIOURS, "/etc/qlora/config.json"])


def manifest(cluster, namespace: str, name: str, behaviour: str = "ok", **spec) -> dict:
    """``operator_harness.manifest`` for the real node: no ``spec.image`` unless given (the
    operator's default, the trainer image) and :data:`POD_RESOURCES` unless given."""
    body = stand_in_manifest(cluster, namespace, name, behaviour, **spec)
    if "image" not in spec:
        del body["spec"]["image"]
    body["spec"]["resources"] = {**body["spec"]["resources"], **POD_RESOURCES, **spec.get("resources", {})}
    return body
