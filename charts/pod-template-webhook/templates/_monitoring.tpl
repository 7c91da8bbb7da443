{{/*
PromQL label matchers selecting this release's scrape targets: metrics.selector, else the job and
namespace a ServiceMonitor of this chart gives them (the job is the Service's name).
*/}}
{{- define "ptw.metricsSelector" -}}
{{- default (printf "job=%q,namespace=%q" (include "ptw.fullname" .) .Release.Namespace) .Values.metrics.selector -}}
{{- end -}}

{{/* metrics.prometheusRule.alertLabels under an alert's `labels:` (nothing when there are none). */}}
{{- define "ptw.alertLabels" -}}
{{- with .Values.metrics.prometheusRule.alertLabels }}{{ toYaml . | nindent 12 }}{{ end -}}
{{- end -}}
