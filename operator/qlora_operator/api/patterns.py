"""Patterns of Kubernetes names and values, their messages, and the field types built on them.

Shared by the spec models (:mod:`qlora_operator.api.spec`) and the pod settings
(:mod:`qlora_operator.api.pod`). Each pattern is the CRD ``pattern`` of its fields; the
pydantic check (:func:`qlora_trainer.config.pattern_check`) says the message instead of
the regex.
"""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import BeforeValidator, Field

from qlora_trainer.config import pattern_check

#: Kubernetes object name (RFC 1123 label): what a Secret or PriorityClass name must be.
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
#: RFC 1035 label: what a Service name must be (a letter first).
DNS_1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
#: RFC 1123 subdomain, for Secret names.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
#: A Kubernetes resource quantity without a sign (``8``, ``500m``, ``64Gi``, ``1e3``).
QUANTITY = (
    r"^\+?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE][+-]?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
#: A label value (empty allowed), e.g. of ``nodeSelector``.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
#: A label or taint key: optional DNS-subdomain prefix and ``/``, then a name of up to 63 characters.
LABEL_KEY = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
#: An extended resource name such as ``nvidia.com/gpu``.
EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-zA-Z0-9]([-a-zA-Z0-9_.]*[a-zA-Z0-9])?$"

MSG_QUANTITY = "must be a Kubernetes quantity such as 8, 500m or 64Gi"
MSG_SECRET_NAME = "must be a Secret name (lowercase RFC 1123 subdomain, e.g. s3-creds)"
MSG_LABEL_VALUE = "must be a label value (up to 63 letters, digits, '-', '_', '.'; alphanumeric at both ends)"
MSG_EXTENDED_RESOURCE = "must be an extended resource name such as nvidia.com/gpu"
MSG_DNS_LABEL = "must be a lowercase RFC 1123 label (letters, digits, '-')"
MSG_DNS_SUBDOMAIN = "must be a lowercase RFC 1123 subdomain (letters, digits, '-', '.')"


def _quantity_to_str(value: Any) -> Any:
    # YAML ``cpu: 8`` is an integer; Kubernetes quantities are int-or-string.
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


#: A resource quantity: ``int-or-string`` in the CRD (``cpu: 8`` and ``cpu: "8"`` both work).
Quantity = Annotated[
    str,
    BeforeValidator(_quantity_to_str),
    Field(max_length=64, json_schema_extra={"pattern": QUANTITY, "x-kubernetes-int-or-string": True}),
    pattern_check(QUANTITY, MSG_QUANTITY),
]


#: A Secret's name (DNS subdomain), for the Secret references below.
SecretName = Annotated[
    str,
    Field(min_length=1, max_length=253, json_schema_extra={"pattern": DNS_SUBDOMAIN}),
    pattern_check(DNS_SUBDOMAIN, MSG_SECRET_NAME),
]


#: Preserve-unknown-fields object (a pass-through core/v1 structure the API server checks
#: when the operator creates the Job).
PASS_THROUGH = {"x-kubernetes-preserve-unknown-fields": True}
PassThrough = Annotated[dict[str, Any], Field(json_schema_extra=PASS_THROUGH)]


__all__ = [
    "DNS_1035_LABEL",
    "DNS_LABEL",
    "DNS_SUBDOMAIN",
    "EXTENDED_RESOURCE",
    "LABEL_KEY",
    "LABEL_VALUE",
    "MSG_DNS_LABEL",
    "MSG_DNS_SUBDOMAIN",
    "MSG_EXTENDED_RESOURCE",
    "MSG_LABEL_VALUE",
    "MSG_QUANTITY",
    "MSG_SECRET_NAME",
    "PASS_THROUGH",
    "PassThrough",
    "QUANTITY",
    "Quantity",
    "SecretName",
]
