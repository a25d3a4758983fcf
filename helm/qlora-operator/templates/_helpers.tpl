{{- define "qlora-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "qlora-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "qlora-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "qlora-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "qlora-operator.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/*
Every API call the operator makes in a namespace it watches, and nothing more
(README.md, "RBAC", says which code path needs each verb). No Secrets: trainer pods
reference them and the kubelet resolves them. The per-job Role the operator creates
grants get on the QLoRAJob and get/patch on its status; RBAC lets the operator create
that Role and bind it only because it holds those verbs itself.
*/}}
{{- define "qlora-operator.rules" -}}
- apiGroups: ["qlora.dev"]
  resources: ["qlorajobs"]
  verbs: ["get", "list", "watch", "patch"]
- apiGroups: ["qlora.dev"]
  resources: ["qlorajobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["qlora.dev"]
  resources: ["qlorajobs/finalizers"]
  verbs: ["update"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["list", "create"]
- apiGroups: [""]
  resources: ["configmaps", "serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
# Kueue's Workloads of queued runs, read into status.queue (without Kueue the list is a 404).
- apiGroups: ["kueue.x-k8s.io"]
  resources: ["workloads"]
  verbs: ["get", "list"]
{{- end -}}
