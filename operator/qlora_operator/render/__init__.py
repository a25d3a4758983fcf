"""Pure builders: a QLoRAJob (its body and parsed spec) + settings -> child manifests.

Nothing here talks to the API or reads the clock. Every child gets deterministic
name, the ``qlora.dev/job`` label, and a controller owner reference to the QLoRAJob
(what ``kopf.adopt`` would set), so deleting the QLoRAJob garbage-collects them and
creating twice is a 409, never a duplicate.

Children, in creation order (the Job last: its existence marks the run as started):

- ConfigMap ``<job>-config`` (run 1) / ``<job>-config-r<N>``: ``config.json``, the
  trainer config (``spec.trainer_config()``).
- ServiceAccount, Role, RoleBinding ``<job>-trainer``: the trainer may ``get`` its
  own QLoRAJob and ``get``/``patch`` its ``status`` (``resourceNames: [<job>]``).
- Only with ``resources.nodes > 1``: a headless Service named like the run's Job
  (``clusterIP: None``, ``publishNotReadyAddresses``, selecting the run's pods). The
  pods set ``subdomain`` to it, so node 0 is reachable as ``<job-name>-0.<service>``.
- batch/v1 Job ``<job>-train`` (run 1) / ``<job>-train-r<N>``.

One node (``resources.nodes: 1``, the default): a Job of one pod; a failed pod is
replaced within the Job (``backoffLimit`` = ``runPolicy.backoffLimit``), and its
``podFailurePolicy`` fails the Job at once on the permanent exit codes
(:data:`PERMANENT_EXIT_CODES`) and ignores disruptions.

Several nodes: an Indexed Job with ``completions = parallelism = nodes``. The pods of a
``torchrun`` group cannot be replaced one by one (the survivors' collectives and
rendezvous are broken), so the Job fails as soon as any pod fails
(``backoffLimit: 0`` and a ``podFailurePolicy`` of ``FailJob`` rules, which also say
why: a disruption, a permanent exit code, anything else). The operator then starts
the next run of the group, a new Job (:mod:`qlora_operator.status` decides, counting
against ``runPolicy.backoffLimit`` except for disruptions); the Job's
``qlora.dev/group-*`` annotations (:class:`GroupAttempt`) carry the count from run to
run.

Trainer contract for more than one GPU in total (``nodes x gpus > 1``): every pod
gets ``QLORA_NNODES``, ``QLORA_NPROC_PER_NODE`` (= ``gpus``), ``QLORA_NODE_RANK`` (the
pod's completion index), ``QLORA_MASTER_ADDR`` and ``QLORA_MASTER_PORT``; the command
stays ``qlora-train --config ...`` (the trainer starts ``torchrun`` itself).

One module per concern; import the package (``from qlora_operator import render``) and
use ``render.<name>``:

- :mod:`qlora_operator.render.names`: child names, labels, annotations, owner
  references, the recorded spec, :class:`GroupAttempt`.
- :mod:`qlora_operator.render.pod`: the trainer pod spec, its env and volumes, and the
  env names, volumes and mount paths ``spec.pod`` may not use.
- :mod:`qlora_operator.render.children`: ConfigMap, ServiceAccount, Role, RoleBinding,
  Service and Job, and :func:`render_children`.
- :mod:`qlora_operator.render.fitcheck_job`: the CPU-only fit-check Job.
"""

from qlora_operator.render.children import *  # noqa: F401,F403
from qlora_operator.render.children import __all__ as _children
from qlora_operator.render.fitcheck_job import *  # noqa: F401,F403
from qlora_operator.render.fitcheck_job import __all__ as _fitcheck_job
from qlora_operator.render.names import *  # noqa: F401,F403
from qlora_operator.render.names import __all__ as _names
from qlora_operator.render.pod import *  # noqa: F401,F403
from qlora_operator.render.pod import __all__ as _pod

__all__ = sorted([*_names, *_pod, *_children, *_fitcheck_job])
