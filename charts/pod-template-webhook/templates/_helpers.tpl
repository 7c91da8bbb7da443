{{/* Chart name, truncated to 63 characters (a DNS label). */}}
{{- define "ptw.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/*
Full name: the prefix of every resource. Truncated to 52 characters so that suffixes such as
"-selfsigned" or "-test" still fit in 63.
*/}}
{{- define "ptw.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- $name := default .Chart.Name .Values.nameOverride -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 52 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{- define "ptw.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Labels selecting the webhook pods. Never change them: Deployment selectors are immutable. */}}
{{- define "ptw.selectorLabels" -}}
app.kubernetes.io/name: {{ include "ptw.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "ptw.labels" -}}
helm.sh/chart: {{ include "ptw.chart" . }}
{{ include "ptw.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: pod-template-webhook
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{- define "ptw.serviceAccountName" -}}
{{- default (include "ptw.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "ptw.webhookConfigurationName" -}}
{{- default (include "ptw.fullname" .) .Values.webhook.configurationName -}}
{{- end -}}

{{/*
metadata.annotations of the webhook configurations (mutating and validating alike): the cert-manager
cainjector annotation in certManager mode, and webhook.annotations. Empty when there are none.
*/}}
{{- define "ptw.webhookConfigurationAnnotations" -}}
{{- if or (eq (include "ptw.certMode" .) "certManager") .Values.webhook.annotations }}
annotations:
  {{- if eq (include "ptw.certMode" .) "certManager" }}
  # cert-manager's cainjector copies the CA of this Certificate into every caBundle below.
  cert-manager.io/inject-ca-from: {{ printf "%s/%s" .Release.Namespace (include "ptw.servingCertificateName" .) }}
  {{- end }}
  {{- with .Values.webhook.annotations }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
{{- end }}
{{- end -}}

{{/*
clientConfig of a webhook. Argument: (list $ "/path" replaceUrlPath). The Service is called at
"/path". In url mode (webhook.url) the URL is used as is, or, with replaceUrlPath, with its path
REPLACED by "/path" (scheme, host and port kept): `https://h:8443/mutate` becomes
`https://h:8443/validate` for the validating webhook.
*/}}
{{- define "ptw.clientConfig" -}}
{{- $ := index . 0 -}}
{{- $path := index . 1 -}}
{{- $replaceUrlPath := index . 2 -}}
{{- $mode := include "ptw.certMode" $ -}}
{{- if $.Values.webhook.url }}
{{- if $replaceUrlPath }}
{{- $u := urlParse $.Values.webhook.url }}
url: {{ urlJoin (dict "scheme" $u.scheme "host" $u.host "path" $path) | quote }}
{{- else }}
url: {{ $.Values.webhook.url | quote }}
{{- end }}
{{- else }}
service:
  name: {{ include "ptw.fullname" $ }}
  namespace: {{ $.Release.Namespace }}
  path: {{ $path }}
  port: {{ $.Values.service.port }}
{{- end }}
{{- if eq $mode "existingSecret" }}
caBundle: {{ $.Values.certs.existingSecret.caBundle | nospace | quote }}
{{- end }}
{{- if eq $mode "builtin" }}
# caBundle: left empty (not rendered). The webhook process fills it in (builtin certificates),
# so the chart renders identically every time, and since no manifest sets the field, neither
# `helm upgrade` nor a GitOps tool's apply resets it.
{{- end }}
{{- end -}}

{{/* namespaceSelector of the webhooks (mutating and validating alike). */}}
{{- define "ptw.namespaceSelector" -}}
{{- if .Values.webhook.namespaceSelector }}
{{- toYaml .Values.webhook.namespaceSelector }}
{{- else }}
matchExpressions:
  # System namespaces. Not the release namespace: the objectSelector already keeps the webhook's
  # own pods out, and task pods in it must be mutated like anywhere else.
  - key: kubernetes.io/metadata.name
    operator: NotIn
    values:
      {{- $excluded := concat (list "kube-system" "kube-public" "kube-node-lease") .Values.webhook.excludeNamespaces | uniq }}
      {{- range $excluded }}
      - {{ . | quote }}
      {{- end }}
{{- end }}
{{- end -}}

{{/*
The mutating webhook entries (SPEC §9), as a YAML list of {name, matchExpressions, matchConditions}:
their objectSelectors are exclusive, so that each pod is sent once.
1. pods with the environment label (the explicit name);
2. unless config.taskNameLabel is empty: pods WITHOUT the environment label that Flyte manages
   (config.managedLabel = config.managedValue) and that carry a task-name label.
webhook.excludeEnvironments: a NotIn on the label for 1; a matchCondition on the task-name's part
before the first "." for 2 (environment names have no dot, so `startsWith(env + ".")` is exact).
*/}}
{{- define "ptw.webhookEntries" -}}
{{- $c := .Values.config }}
{{- $excluded := .Values.webhook.excludeEnvironments }}
{{- $byLabel := list (dict "key" $c.environmentLabel "operator" "Exists") }}
{{- with $excluded }}
{{- $byLabel = append $byLabel (dict "key" $c.environmentLabel "operator" "NotIn" "values" .) }}
{{- end }}
- name: {{ .Values.webhook.name | quote }}
  matchExpressions: {{ toJson $byLabel }}
{{- if $c.taskNameLabel }}
{{- $byTask := list (dict "key" $c.environmentLabel "operator" "DoesNotExist") (dict "key" $c.managedLabel "operator" "In" "values" (list $c.managedValue)) (dict "key" $c.taskNameLabel "operator" "Exists") }}
- name: {{ printf "task-name.%s" .Values.webhook.name | quote }}
  matchExpressions: {{ toJson $byTask }}
  {{- with $excluded }}
  {{- $labels := "object.metadata.labels" }}
  {{- $task := printf "%s[%s]" $labels (toJson $c.taskNameLabel) }}
  matchConditions:
    - name: environment-not-exported
      expression: {{ printf "!has(%s) || !(%s in %s) || !%s.exists(e, %s.startsWith(e + \".\"))" $labels (toJson $c.taskNameLabel) $labels (toJson .) $task | quote }}
  {{- end }}
{{- end }}
{{- end -}}

{{/* Secret with the serving certificate in builtin and certManager modes. */}}
{{- define "ptw.certSecretName" -}}
{{- default (printf "%s-tls" (include "ptw.fullname" .)) .Values.certs.secretName -}}
{{- end -}}

{{/* The cert-manager Certificate of the webhook (named in cert-manager.io/inject-ca-from). */}}
{{- define "ptw.servingCertificateName" -}}
{{- printf "%s-serving" (include "ptw.fullname" .) -}}
{{- end -}}

{{/* DNS names of the serving certificate, as a list. */}}
{{- define "ptw.dnsNames" -}}
{{- $svc := include "ptw.fullname" . -}}
{{- $names := list (printf "%s.%s.svc" $svc .Release.Namespace) (printf "%s.%s.svc.%s" $svc .Release.Namespace .Values.certs.clusterDomain) -}}
{{- range .Values.certs.extraDnsNames -}}
{{- $names = append $names . -}}
{{- end -}}
{{- toJson (uniq $names) -}}
{{- end -}}

{{- define "ptw.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* The certificate mode, validated; fails rendering with a clear message on a bad combination. */}}
{{- define "ptw.certMode" -}}
{{- $mode := .Values.certs.mode -}}
{{- if eq $mode "existingSecret" -}}
{{- if not .Values.certs.existingSecret.name -}}
{{- fail "certs.mode=existingSecret requires certs.existingSecret.name: the kubernetes.io/tls Secret (keys tls.crt, tls.key) the webhook serves" -}}
{{- end -}}
{{- if not .Values.certs.existingSecret.caBundle -}}
{{- fail "certs.mode=existingSecret requires certs.existingSecret.caBundle: the base64-encoded PEM of the CA that signed the Secret's certificate (the API server verifies the webhook with it)" -}}
{{- end -}}
{{- else if eq $mode "certManager" -}}
{{- with .Values.certs.certManager.issuerRef -}}
{{- if not .name -}}
{{- fail "certs.certManager.issuerRef needs a name (or leave issuerRef empty for a self-signed CA chain)" -}}
{{- end -}}
{{- end -}}
{{- else if ne $mode "builtin" -}}
{{- fail (printf "certs.mode must be builtin, certManager or existingSecret, not %q" $mode) -}}
{{- end -}}
{{- $mode -}}
{{- end -}}

{{/* The platform namespace: config.platformNamespace, else the release namespace. */}}
{{- define "ptw.platformNamespace" -}}
{{- default .Release.Namespace .Values.config.platformNamespace -}}
{{- end -}}

{{/* Namespaces whose ConfigMaps the webhook reads when watchNamespaces is set: those plus the platform namespace. */}}
{{- define "ptw.watchedNamespaces" -}}
{{- $all := list (include "ptw.platformNamespace" .) -}}
{{- range .Values.config.watchNamespaces -}}
{{- $all = append $all . -}}
{{- end -}}
{{- toJson (uniq $all) -}}
{{- end -}}

{{/* Hardened container securityContext. */}}
{{- define "ptw.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
privileged: false
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Hardened pod securityContext. */}}
{{- define "ptw.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
fsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* "host:port" for a listener; IPv6 addresses get brackets. Argument: (list address port). */}}
{{- define "ptw.hostPort" -}}
{{- $addr := index . 0 -}}
{{- $port := index . 1 -}}
{{- if contains ":" $addr -}}
{{- printf "[%s]:%v" (trimAll "[]" $addr) $port -}}
{{- else -}}
{{- printf "%s:%v" $addr $port -}}
{{- end -}}
{{- end -}}

{{/* RBAC rules of the template reader (ClusterRole, or a Role per watched namespace). */}}
{{- define "ptw.templateReaderRules" -}}
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get", "list", "watch"]
# PodTemplate objects as a second template source: the watch needs list and watch, nothing more.
- apiGroups: [""]
  resources: ["podtemplates"]
  verbs: ["list", "watch"]
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end -}}

{{/*
Environment of the binary that names what the webhook reads and how it decides (labels,
annotations, policy, the default template): one list for `serve` (the Deployment) and `audit` (the
CronJob), so that the audit judges pods by the webhook's own rules.
*/}}
{{- define "ptw.policyEnv" -}}
- name: PTW_ENVIRONMENT_LABEL
  value: {{ .Values.config.environmentLabel | quote }}
- name: PTW_MANAGED_LABEL
  value: {{ .Values.config.managedLabel | quote }}
- name: PTW_MANAGED_VALUE
  value: {{ .Values.config.managedValue | quote }}
- name: PTW_TASK_NAME_LABEL
  value: {{ .Values.config.taskNameLabel | quote }}
- name: PTW_TEMPLATE_ANNOTATION
  value: {{ .Values.config.templateAnnotation | quote }}
- name: PTW_SOURCE_LABEL
  value: {{ .Values.config.sourceLabel | quote }}
- name: PTW_APPLIED_ANNOTATION
  value: {{ .Values.config.appliedAnnotation | quote }}
- name: PTW_MODE_ANNOTATION
  value: {{ .Values.config.modeAnnotation | quote }}
- name: PTW_ON_MISSING_TEMPLATE
  value: {{ .Values.config.onMissingTemplate | quote }}
- name: PTW_ON_BROKEN_TEMPLATE
  value: {{ .Values.config.onBrokenTemplate | quote }}
- name: PTW_ON_CONFLICT
  value: {{ .Values.config.onConflict | quote }}
{{- with .Values.config.defaultTemplate }}
- name: PTW_DEFAULT_TEMPLATE
  value: {{ . | quote }}
{{- end }}
{{- end -}}

{{/* RBAC rules of `audit` for the template sources: it lists them once, never watches or gets. */}}
{{- define "ptw.auditTemplateRules" -}}
- apiGroups: [""]
  resources: ["configmaps", "podtemplates"]
  verbs: ["list"]
{{- end -}}
