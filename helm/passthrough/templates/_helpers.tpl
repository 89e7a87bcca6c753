{{/*
Expand the name of the chart.
*/}}
{{- define "passthrough.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Create a default fully qualified app name.
We truncate at 63 chars because some Kubernetes name fields are limited to this (by the DNS naming spec).
If release name contains chart name it will be used as a full name.
*/}}
{{- define "passthrough.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Create chart name and version as used by the chart label.
*/}}
{{- define "passthrough.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
Common labels
*/}}
{{- define "passthrough.labels" -}}
helm.sh/chart: {{ include "passthrough.chart" . }}
{{ include "passthrough.selectorLabels" . }}
{{- if .Chart.AppVersion }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
{{- end }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/*
Selector labels
*/}}
{{- define "passthrough.selectorLabels" -}}
app.kubernetes.io/name: {{ include "passthrough.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Create the name of the service account to use
*/}}
{{- define "passthrough.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "passthrough.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/*
The container image.
*/}}
{{- define "passthrough.image" -}}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion | toString) }}
{{- end }}

{{/*
An environment value as a string: lists are joined with commas, whole numbers are
printed without an exponent (values arrive as float64), nil is empty.
*/}}
{{- define "passthrough.envValue" -}}
{{- $v := . -}}
{{- if kindIs "invalid" $v -}}
{{- else if kindIs "slice" $v -}}
{{- join "," $v -}}
{{- else if and (kindIs "float64" $v) (eq $v (float64 (int64 $v))) -}}
{{- int64 $v -}}
{{- else -}}
{{- $v -}}
{{- end -}}
{{- end }}

{{/*
Does the chart create the credentials Secret? "true" or empty.
*/}}
{{- define "passthrough.createSecret" -}}
{{- $c := .Values.registry.credentials -}}
{{- if and (not $c.existingSecret) (or $c.username $c.password $c.bearerToken) -}}
true
{{- end -}}
{{- end }}

{{/*
Name of the Secret holding the registry credentials.
*/}}
{{- define "passthrough.secretName" -}}
{{- .Values.registry.credentials.existingSecret | default (printf "%s-registry" (include "passthrough.fullname" .)) }}
{{- end }}

{{/*
Seconds in-flight downloads need after the pod starts terminating.
*/}}
{{- define "passthrough.minGracePeriod" -}}
{{- add (int64 .Values.preStopSleepSeconds) (int64 .Values.gunicorn.gracefulTimeout) }}
{{- end }}

{{/*
terminationGracePeriodSeconds: computed (minimum + 15 s), or the value given if it is
above the minimum; fail otherwise.
*/}}
{{- define "passthrough.terminationGracePeriodSeconds" -}}
{{- $min := include "passthrough.minGracePeriod" . | int64 }}
{{- $given := .Values.terminationGracePeriodSeconds }}
{{- if or (kindIs "invalid" $given) (eq (toString $given) "") }}
{{- add $min 15 }}
{{- else if le (int64 $given) $min }}
{{- fail (printf "terminationGracePeriodSeconds (%d) must be greater than preStopSleepSeconds + gunicorn.gracefulTimeout (%d), or downloads are killed mid-transfer" (int64 $given) $min) }}
{{- else }}
{{- int64 $given }}
{{- end }}
{{- end }}

{{/*
Checks of values that would otherwise fail only at run time.
*/}}
{{- define "passthrough.validate" -}}
{{- $c := .Values.registry.credentials -}}
{{- if and $c.existingSecret (or $c.username $c.password $c.bearerToken) }}
{{- fail "registry.credentials: set either existingSecret or username/password/bearerToken, not both" }}
{{- end }}
{{- if ne (empty $c.username) (empty $c.password) }}
{{- fail "registry.credentials: set username and password together" }}
{{- end }}
{{- if not (has .Values.registry.clientAuth (list "optional" "required" "off")) }}
{{- fail (printf "registry.clientAuth must be optional, required or off, not %q" (toString .Values.registry.clientAuth)) }}
{{- end }}
{{- if not (has .Values.config.logFormat (list "text" "json")) }}
{{- fail (printf "config.logFormat must be text or json, not %q" (toString .Values.config.logFormat)) }}
{{- end }}
{{- if or (not .Values.config.tempDir) (eq (clean .Values.config.tempDir) "/tmp") }}
{{- fail "config.tempDir must be set, and not to /tmp (which has its own volume)" }}
{{- end }}
{{- if and .Values.persistence.enabled (not .Values.config.cacheDir) }}
{{- fail "persistence.enabled needs config.cacheDir: the volume is mounted there" }}
{{- end }}
{{- end }}
