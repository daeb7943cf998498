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
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The labels of every object with more on top (`extra` wins on a shared key, so a
`release` in both commonLabels and a ServiceMonitor's labels is written once). Call with
(dict "root" $ "extra" {...}); "component" adds app.kubernetes.io/component.
*/}}
{{- define "agent-bus.labelsWith" -}}
{{- $labels := fromYaml (include "agent-bus.labels" .root) }}
{{- with .component }}{{ $_ := set $labels "app.kubernetes.io/component" . }}{{ end }}
{{- toYaml (merge (deepCopy (.extra | default dict)) $labels) }}
{{- end }}

{{/*
Labels of a pod template: the selector labels, the role (`component`), then the role's
podLabels and commonLabels (the schema keeps both off the chart's own label keys, so
nothing is written twice). Call with (dict "root" $ "component" "api" "podLabels" {...}).
*/}}
{{- define "agent-bus.podLabels" -}}
{{ include "agent-bus.selectorLabels" .root }}
app.kubernetes.io/component: {{ .component }}
{{- with merge (dict) (.podLabels | default dict) (.root.Values.commonLabels | default dict) }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
imagePullSecrets of every pod: the chart's, then global.imagePullSecrets (names or
{name: ...}, as bitnami charts take them).
*/}}
{{- define "agent-bus.imagePullSecrets" -}}
{{- $secrets := list }}
{{- range .Values.imagePullSecrets }}{{ $secrets = append $secrets . }}{{ end }}
{{- range ((.Values.global | default dict).imagePullSecrets | default list) }}
{{- if kindIs "string" . }}{{ $secrets = append $secrets (dict "name" .) }}{{ else }}{{ $secrets = append $secrets . }}{{ end }}
{{- end }}
{{- with $secrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
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
{{- $repository := include "agent-bus.imageRepository" . }}
{{- if .Values.image.digest }}
{{- printf "%s@%s" $repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" $repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
image.repository, with its registry replaced by global.imageRegistry when a parent chart
sets one (the first path segment is a registry when it has a `.` or `:` or is
`localhost`, as Docker reads references).
*/}}
{{- define "agent-bus.imageRepository" -}}
{{- $registry := (.Values.global | default dict).imageRegistry | default "" }}
{{- if $registry }}
{{- $parts := splitList "/" .Values.image.repository }}
{{- $first := first $parts }}
{{- if and (gt (len $parts) 1) (or (contains "." $first) (contains ":" $first) (eq $first "localhost")) }}
{{- $parts = rest $parts }}
{{- end }}
{{- printf "%s/%s" (trimSuffix "/" $registry) (join "/" $parts) }}
{{- else }}
{{- .Values.image.repository }}
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

{{/*
The PromQL label matchers that select the dispatchers' series: monitoring.prometheusRule.jobSelector,
else job="<monitoring.job>" (the job label the ServiceMonitor sets). The alert rules and
the dashboard ConfigMap use it; so should any other query the chart renders (a
Prometheus scaler's, for example).
*/}}
{{- define "agent-bus.jobSelector" -}}
{{- .Values.monitoring.prometheusRule.jobSelector | default (printf "job=%q" .Values.monitoring.job) }}
{{- end }}

{{/*
The placement file the dispatcher reads (config.placement), with the chart's shared
models/datasets claim (gpuStorage) listed in its volume_claims when gpuStorage.enabled and
gpuStorage.mountable, so tasks can mount it by name. The text is kept as written (its
comments too) when it ends its claims with `volume_claims: []`, the shipped form; any other
form is re-rendered from its parsed content. A claim of that name already listed is left
as the operator wrote it.
*/}}
{{- define "agent-bus.placement" -}}
{{- $text := .Values.config.placement }}
{{- $storage := .Values.gpuStorage }}
{{- if and $storage.enabled $storage.mountable }}
{{- $parsed := fromYaml $text }}
{{- $listed := false }}
{{- range ($parsed.volume_claims | default list) }}
{{- if eq .name $storage.claimName }}{{ $listed = true }}{{ end }}
{{- end }}
{{- if not $listed }}
{{- $claim := dict "name" $storage.claimName "tenants" $storage.tenants "writable" $storage.writable }}
{{- if regexMatch "(?m)^volume_claims: \\[\\]\\s*$" $text }}
{{- $block := printf "volume_claims:\n  - name: %s\n    tenants: [%s]\n    writable: %t" $storage.claimName (join ", " (include "agent-bus.quoteAll" $storage.tenants | splitList ",")) $storage.writable }}
{{- $text = regexReplaceAll "(?m)^volume_claims: \\[\\]\\s*$" $text $block }}
{{- else }}
{{- $_ := set $parsed "volume_claims" (append ($parsed.volume_claims | default list) $claim) }}
{{- $text = toYaml $parsed }}
{{- end }}
{{- end }}
{{- end }}
{{- $text }}
{{- end }}

{{/* Each string of a list in double quotes, joined by commas. */}}
{{- define "agent-bus.quoteAll" -}}
{{- $quoted := list }}
{{- range . }}{{ $quoted = append $quoted (. | quote) }}{{ end }}
{{- join "," $quoted }}
{{- end }}

{{/*
The Pod Security level the tasks namespace enforces: tasks.podSecurity, lowered to
`baseline` when a GPU class of the placement file has `security.profile: baseline` (its
pods may run as root, which `restricted` refuses).
*/}}
{{- define "agent-bus.tasksPodSecurity" -}}
{{- $level := .Values.tasks.podSecurity }}
{{- $parsed := fromYaml (include "agent-bus.placement" .) }}
{{- range ($parsed.gpu_classes | default list) }}
{{- if and (eq $level "restricted") (eq (dig "security" "profile" "restricted" .) "baseline") }}
{{- $level = "baseline" }}
{{- end }}
{{- end }}
{{- $level }}
{{- end }}

{{/*
The `except` an allowList CIDR needs so the cloud metadata address stays unreachable:
169.254.169.254/32 when an IPv4 CIDR contains it, fd00:ec2::254/128 for ::/0 or fd00::/8
and wider; empty otherwise. A CIDR that is only the metadata address fails the render.
Takes (dict "cidr" "a.b.c.d/n" "index" i).
*/}}
{{- define "agent-bus.metadataExcept" -}}
{{- $cidr := .cidr }}
{{- $field := printf "tasks.egress.allowList[%d].cidr" (int .index) }}
{{- if not (regexMatch "^[0-9a-fA-F.:]+/[0-9]+$" $cidr) }}
{{- fail (printf "%s: %q is not a CIDR (address/prefix length)" $field $cidr) }}
{{- end }}
{{- $parts := splitList "/" $cidr }}
{{- $bits := atoi (last $parts) }}
{{- if contains ":" $cidr }}
{{- if and (le $bits 8) (or (eq $cidr "::/0") (hasPrefix "fd" (lower (first $parts)))) }}fd00:ec2::254/128{{ end }}
{{- else }}
{{- $octets := splitList "." (first $parts) }}
{{- if or (ne (len $octets) 4) (gt $bits 32) }}
{{- fail (printf "%s: %q is not an IPv4 CIDR" $field $cidr) }}
{{- end }}
{{- $address := 0 }}
{{- range $octets }}{{ $address = add (mul $address 256) (atoi .) }}{{ end }}
{{- $metadata := add (mul 169 16777216) (mul 254 65536) (mul 169 256) 254 }}
{{- $block := 1 }}
{{- range until (sub 32 $bits | int) }}{{ $block = mul $block 2 }}{{ end }}
{{- if eq (div $address $block) (div $metadata $block) }}
{{- if eq $bits 32 }}
{{- fail (printf "%s: %s is the cloud metadata address, which task pods may never reach" $field $cidr) }}
{{- end }}169.254.169.254/32
{{- end }}
{{- end }}
{{- end }}
