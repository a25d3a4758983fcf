"""The QLoRAJob API (``qlora.dev/v1alpha1``), one module per part; import from here.

- :mod:`qlora_operator.api.patterns`: patterns of Kubernetes names and values, their
  messages, and the field types built on them (``Quantity``, ``SecretName``, ...).
- :mod:`qlora_operator.api.pod`: ``spec.pod`` (ServiceAccount annotations, env, volumes, ...).
- :mod:`qlora_operator.api.spec`: the API's identity (group, version, names), the spec
  models, :func:`parse_spec`.
- :mod:`qlora_operator.api.status`: phase, condition types, attempts, progress, artifacts.
- :mod:`qlora_operator.api.changes`: which fields are fixed while a run is active.
"""

from qlora_operator.api.changes import *  # noqa: F401,F403
from qlora_operator.api.changes import __all__ as _changes
from qlora_operator.api.patterns import *  # noqa: F401,F403
from qlora_operator.api.patterns import __all__ as _patterns
from qlora_operator.api.pod import *  # noqa: F401,F403
from qlora_operator.api.pod import __all__ as _pod
from qlora_operator.api.spec import *  # noqa: F401,F403
from qlora_operator.api.spec import __all__ as _spec
from qlora_operator.api.status import *  # noqa: F401,F403
from qlora_operator.api.status import __all__ as _status
from qlora_trainer.config import DatasetSource, LoraSettings, ModelSource, OutputTarget, QuantizationConfig, TrainingSettings

__all__ = sorted([
    *_patterns, *_pod, *_spec, *_status, *_changes,
    "DatasetSource", "LoraSettings", "ModelSource", "OutputTarget", "QuantizationConfig", "TrainingSettings",
])
