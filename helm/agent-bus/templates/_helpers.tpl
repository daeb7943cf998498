{{/* The chart name, 63 characters at most. */}}
{{- define "agent-bus.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The prefix of every object name: the release name when it already holds the chart name,
else `<release>-<chart>`; 54 characters at most, so role suffixes (`-launcher`) still fit
the 63-character limit.
*/}}
{{- define "agent-bus.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 54 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 54 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "agent-bus.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "agent-bus.labels" -}}
helm.sh/chart: {{ include "agent-bus.chart" . }}
{{ include "agent-bus.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: agent-bus
{{- end }}

{{/* Labels that select the dispatcher's pods (add app.kubernetes.io/component per role). */}}
{{- define "agent-bus.selectorLabels" -}}
app.kubernetes.io/name: {{ include "agent-bus.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "agent-bus.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "agent-bus.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The image reference: the digest wins over the tag; the tag defaults to appVersion. */}}
{{- define "agent-bus.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* Where task pods send their reports: runner.reportUrl, else the api Service. */}}
{{- define "agent-bus.reportUrl" -}}
{{- if .Values.runner.reportUrl }}
{{- .Values.runner.reportUrl }}
{{- else }}
{{- printf "http://%s-api.%s.svc:%v" (include "agent-bus.fullname" .) .Release.Namespace .Values.service.port }}
{{- end }}
{{- end }}

{{/* The Secret holding database-url and redis-url (and optionally report-secret). */}}
{{- define "agent-bus.secretName" -}}
{{- if .Values.secrets.existingSecret }}
{{- .Values.secrets.existingSecret }}
{{- else }}
{{- include "agent-bus.fullname" . }}
{{- end }}
{{- end }}

{{/* The Secret sources must not contradict each other. */}}
{{- define "agent-bus.validate" -}}
{{- $sources := 0 }}
{{- if and .Values.secrets.create (not .Values.secrets.existingSecret) }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.secrets.existingSecret }}{{ $sources = add1 $sources }}{{ end }}
{{- if .Values.externalSecret.enabled }}{{ $sources = add1 $sources }}{{ end }}
{{- if ne (int $sources) 1 }}
{{- fail "choose exactly one of secrets.create, secrets.existingSecret and externalSecret.enabled (set secrets.create=false with the other two)" }}
{{- end }}
{{- if and .Values.externalSecret.enabled (or .Values.postgresql.enabled .Values.redis.enabled) }}
{{- fail "externalSecret.enabled cannot be combined with the in-cluster postgresql or redis (their URLs are written by the chart)" }}
{{- end }}
{{- if eq .Values.tasks.namespace .Release.Namespace }}
{{- fail "tasks.namespace must differ from the release namespace: the task Jobs run under a stricter policy than the dispatcher" }}
{{- end }}
{{- end }}
