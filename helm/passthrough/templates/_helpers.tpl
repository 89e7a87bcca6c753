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
Does the service speak TLS? "true" or empty.
*/}}
{{- define "passthrough.tlsEnabled" -}}
{{- if or .Values.tls.selfSigned .Values.tls.existingSecret -}}
true
{{- end -}}
{{- end }}

{{/*
TLS_NAMES for tls.selfSigned: the Service's DNS names, loopback, then tls.names.
*/}}
{{- define "passthrough.tlsNames" -}}
{{- $svc := include "passthrough.fullname" . }}
{{- $ns := .Release.Namespace }}
{{- $names := list $svc (printf "%s.%s" $svc $ns) (printf "%s.%s.svc" $svc $ns) (printf "%s.%s.svc.cluster.local" $svc $ns) "localhost" "127.0.0.1" }}
{{- range .Values.tls.names }}
{{- $names = append $names (toString .) }}
{{- end }}
{{- join "," (uniq $names) }}
{{- end }}

{{/*
Does the pod get TOKEN_SECRET? "true" or empty: an existing Secret, a value,
proxyMode=authenticated or hosted users (both need one: the chart then generates it).
*/}}
{{- define "passthrough.tokenSecretUsed" -}}
{{- $t := .Values.v2.tokenSecret -}}
{{- if or $t.existingSecret $t.value (eq .Values.v2.proxyMode "authenticated") (include "passthrough.htpasswdSecretName" .) -}}
true
{{- end -}}
{{- end }}

{{/*
Does the chart create the TOKEN_SECRET Secret? "true" or empty.
*/}}
{{- define "passthrough.createTokenSecret" -}}
{{- if and (include "passthrough.tokenSecretUsed" .) (not .Values.v2.tokenSecret.existingSecret) -}}
true
{{- end -}}
{{- end }}

{{/*
Name of the Secret holding TOKEN_SECRET.
*/}}
{{- define "passthrough.tokenSecretName" -}}
{{- .Values.v2.tokenSecret.existingSecret | default (printf "%s-token" (include "passthrough.fullname" .)) }}
{{- end }}

{{/*
Name of the Secret holding REGISTRY_AUTH_FILE, or empty when there is none.
*/}}
{{- define "passthrough.authFileSecretName" -}}
{{- $a := .Values.v2.authFile -}}
{{- if $a.existingSecret -}}
{{- $a.existingSecret -}}
{{- else if $a.dockerConfigJson -}}
{{- printf "%s-registry-auth" (include "passthrough.fullname" .) -}}
{{- end -}}
{{- end }}

{{/*
Where the pod finds REGISTRY_AUTH_FILE, the TLS certificate, HTPASSWD_FILE and ACCESS_FILE.
*/}}
{{- define "passthrough.authFileDir" -}}/etc/passthrough/registry-auth{{- end }}
{{- define "passthrough.tlsDir" -}}/etc/passthrough/tls{{- end }}
{{- define "passthrough.htpasswdDir" -}}/etc/passthrough/htpasswd{{- end }}
{{- define "passthrough.accessDir" -}}/etc/passthrough/access{{- end }}
{{- define "passthrough.syncDir" -}}/etc/passthrough/sync{{- end }}
{{- define "passthrough.upstreamCaDir" -}}/etc/passthrough/upstream-ca{{- end }}

{{/*
"true" when upstream.caBundle names a ConfigMap or a Secret (UPSTREAM_CA_FILE), else empty.
*/}}
{{- define "passthrough.upstreamCa" -}}
{{- $c := .Values.upstream.caBundle -}}
{{- if or $c.existingConfigMap $c.existingSecret -}}true{{- end -}}
{{- end }}

{{/*
Name of the Secret holding HTPASSWD_FILE (hosted users), or empty when there is none.
*/}}
{{- define "passthrough.htpasswdSecretName" -}}
{{- $h := .Values.hosted.htpasswd -}}
{{- if $h.existingSecret -}}
{{- $h.existingSecret -}}
{{- else if $h.content -}}
{{- printf "%s-htpasswd" (include "passthrough.fullname" .) -}}
{{- end -}}
{{- end }}

{{/*
Labels of the gc CronJob's pods. Not the selector labels: the Service, the
PodDisruptionBudget and the pods' NetworkPolicy must not count a gc pod as a server.
*/}}
{{- define "passthrough.syncSelectorLabels" -}}
app.kubernetes.io/name: {{ include "passthrough.name" . }}-sync
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: sync
{{- end }}

{{- define "passthrough.gcSelectorLabels" -}}
app.kubernetes.io/name: {{ include "passthrough.name" . }}-gc
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: gc
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
{{- $store := .Values.store }}
{{- if not (has $store.type (list "filesystem" "s3")) }}
{{- fail (printf "store.type must be filesystem or s3, not %q" (toString $store.type)) }}
{{- end }}
{{- if eq $store.type "filesystem" }}
{{- if .Values.autoscaling.enabled }}
{{- fail "autoscaling.enabled needs store.type=s3: with store.type=filesystem every pod has its own cache" }}
{{- end }}
{{- if gt (int .Values.replicaCount) 1 }}
{{- fail (printf "replicaCount %d needs store.type=s3: with store.type=filesystem every pod has its own cache (use 1)" (int .Values.replicaCount)) }}
{{- end }}
{{- else }}
{{- if not $store.s3.bucket }}
{{- fail "store.type=s3 needs store.s3.bucket" }}
{{- end }}
{{- if .Values.persistence.enabled }}
{{- fail "persistence.enabled is for store.type=filesystem: with s3 the bucket is the cache (turn persistence off)" }}
{{- end }}
{{- if and $store.s3.existingSecret (not (and $store.s3.accessKeyIdKey $store.s3.secretAccessKeyKey)) }}
{{- fail "store.s3.existingSecret needs both accessKeyIdKey and secretAccessKeyKey" }}
{{- end }}
{{- end }}
{{- if not (regexMatch "^[0-9]*$" (include "passthrough.envValue" $store.s3.lifecycleDays)) }}
{{- fail (printf "store.s3.lifecycleDays must be a whole number of days (0: off), not %q" (toString $store.s3.lifecycleDays)) }}
{{- end }}
{{- $redis := .Values.redis }}
{{- if and $redis.url $redis.existingSecret }}
{{- fail "redis: set either url or existingSecret, not both" }}
{{- end }}
{{- if and $redis.existingSecret (not $redis.urlKey) }}
{{- fail "redis.existingSecret needs redis.urlKey" }}
{{- end }}
{{- if regexMatch "^[^/]*//[^/@]*:[^/@]*@" (toString $redis.url) }}
{{- fail "redis.url holds a password: put the URL in a Secret and set redis.existingSecret" }}
{{- end }}
{{- $v2 := .Values.v2 }}
{{- if not (has $v2.proxyMode (list "transparent" "authenticated")) }}
{{- fail (printf "v2.proxyMode must be transparent or authenticated, not %q" (toString $v2.proxyMode)) }}
{{- end }}
{{- if and (eq $v2.proxyMode "authenticated") (not $v2.publicUrl) }}
{{- fail "v2.proxyMode=authenticated needs v2.publicUrl: the token realm clients are sent to (never taken from the Host header)" }}
{{- end }}
{{- if and $v2.publicUrl (not (regexMatch "^https?://[^/?#@]+(/[^?#]*)?$" (toString $v2.publicUrl))) }}
{{- fail "v2.publicUrl must be http(s)://host[:port][/path]" }}
{{- end }}
{{- if and $v2.tokenSecret.existingSecret $v2.tokenSecret.value }}
{{- fail "v2.tokenSecret: set either existingSecret or value, not both" }}
{{- end }}
{{- if and $v2.tokenSecret.existingSecret (not $v2.tokenSecret.key) }}
{{- fail "v2.tokenSecret.existingSecret needs v2.tokenSecret.key" }}
{{- end }}
{{- if and $v2.tokenSecret.value (lt (len (toString $v2.tokenSecret.value)) 16) }}
{{- fail "v2.tokenSecret.value must be at least 16 characters" }}
{{- end }}
{{- if and $v2.authFile.existingSecret $v2.authFile.dockerConfigJson }}
{{- fail "v2.authFile: set either existingSecret or dockerConfigJson, not both" }}
{{- end }}
{{- if and $v2.authFile.existingSecret (not $v2.authFile.key) }}
{{- fail "v2.authFile.existingSecret needs v2.authFile.key" }}
{{- end }}
{{- $ca := .Values.upstream.caBundle }}
{{- if and $ca.existingConfigMap $ca.existingSecret }}
{{- fail "upstream.caBundle: set either existingConfigMap or existingSecret, not both" }}
{{- end }}
{{- if and (include "passthrough.upstreamCa" .) (not $ca.key) }}
{{- fail "upstream.caBundle needs upstream.caBundle.key: the PEM file's key" }}
{{- end }}
{{- if and $v2.s3Redirect (ne $store.type "s3") }}
{{- fail "v2.s3Redirect needs store.type=s3: it redirects blob reads to the bucket" }}
{{- end }}
{{- range $alias, $url := $v2.upstreams }}
{{- if not (regexMatch "^[a-z0-9]+([._-][a-z0-9]+)*$" $alias) }}
{{- fail (printf "v2.upstreams: alias %q must be a lowercase name such as hub or ghcr" $alias) }}
{{- end }}
{{- if or (not $url) (contains "@" (toString $url)) (contains "," (toString $url)) }}
{{- fail (printf "v2.upstreams.%s must be a registry URL without credentials (use v2.authFile)" $alias) }}
{{- end }}
{{- end }}
{{- $tls := .Values.tls }}
{{- if and $tls.selfSigned $tls.existingSecret }}
{{- fail "tls: set either selfSigned or existingSecret, not both" }}
{{- end }}
{{- if and $tls.selfSigned (or .Values.autoscaling.enabled (gt (int .Values.replicaCount) 1)) }}
{{- fail "tls.selfSigned makes a CA per pod: with more than one replica use tls.existingSecret (one certificate for all, e.g. from cert-manager)" }}
{{- end }}
{{- $hosted := .Values.hosted }}
{{- $users := include "passthrough.htpasswdSecretName" . }}
{{- range $hosted.repositories }}
{{- $pattern := toString . | trimAll "/" }}
{{- range splitList "/" $pattern }}
{{- if not (regexMatch "^(\\*\\*|\\*|[a-z0-9*]+(([._]|__|-+)[a-z0-9*]+)*)$" .) }}
{{- fail (printf "hosted.repositories: %q is not a pattern such as team/* or apps/**" $pattern) }}
{{- end }}
{{- end }}
{{- end }}
{{- if and $hosted.htpasswd.existingSecret $hosted.htpasswd.content }}
{{- fail "hosted.htpasswd: set either existingSecret or content, not both" }}
{{- end }}
{{- range $number, $line := splitList "\n" (toString $hosted.htpasswd.content) }}
{{- $line = trim $line }}
{{- if and $line (not (hasPrefix "#" $line)) (not (regexMatch "^[^:\\s]+:\\$2[aby]\\$[0-9]{2}\\$[./A-Za-z0-9]{53}$" $line)) }}
{{- fail (printf "hosted.htpasswd.content: line %d is not user:<bcrypt hash> (make it with htpasswd -nB <user>)" (add1 $number)) }}
{{- end }}
{{- end }}
{{- if and $hosted.htpasswd.existingSecret (not $hosted.htpasswd.key) }}
{{- fail "hosted.htpasswd.existingSecret needs hosted.htpasswd.key" }}
{{- end }}
{{- if and $hosted.repositories (not $users) }}
{{- fail "hosted.repositories needs hosted.htpasswd (existingSecret or content): a push needs one of passthrough's users" }}
{{- end }}
{{- if and $users (not $v2.publicUrl) }}
{{- fail "hosted.htpasswd needs v2.publicUrl: the token realm users log in at (never taken from the Host header)" }}
{{- end }}
{{- if and .Values.sync.enabled (not .Values.sync.file) }}
{{- fail "sync.enabled needs sync.file: the images the CronJob fetches ({images: [...]})" }}
{{- end }}
{{- if and .Values.sync.file (not (kindIs "map" .Values.sync.file)) }}
{{- fail "sync.file must be a mapping: {images: [{repository, tags, ...}]}" }}
{{- end }}
{{- if and $hosted.repositories (eq $store.type "s3") (gt (int $store.s3.lifecycleDays) 0) }}
{{- fail "store.s3.lifecycleDays would expire pushed content too (the rule knows no pins): keep it 0 with hosted.repositories" }}
{{- end }}
{{- if and $hosted.access (not (kindIs "map" $hosted.access)) }}
{{- fail "hosted.access must be a mapping: {groups: {...}, rules: [...]}" }}
{{- end }}
{{- if $hosted.gc.enabled }}
{{- if not $hosted.repositories }}
{{- fail "hosted.gc needs hosted.repositories: it collects hosted content only" }}
{{- end }}
{{- if not (regexMatch "^[0-9]+(s|m|h|d)$" (toString $hosted.gc.grace)) }}
{{- fail (printf "hosted.gc.grace must be a duration such as 90s, 15m, 1h or 2d, not %q" (toString $hosted.gc.grace)) }}
{{- end }}
{{- if eq $store.type "filesystem" }}
{{- if not (and .Values.config.cacheDir .Values.persistence.enabled) }}
{{- fail "hosted.gc with store.type=filesystem needs persistence.enabled: the CronJob must mount the pods' cache volume (or use store.type=s3)" }}
{{- end }}
{{- if and (not .Values.persistence.existingClaim) (has "ReadWriteOncePod" .Values.persistence.accessModes) }}
{{- fail "hosted.gc cannot mount a ReadWriteOncePod cache volume beside the pods: use ReadWriteOnce (same node) or store.type=s3" }}
{{- end }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Environment variables read from Secrets: a list of (name, secret, key), key never empty.
*/}}
{{- define "passthrough.secretEnv" -}}
{{- $cred := .Values.registry.credentials }}
{{- $secretName := include "passthrough.secretName" . }}
{{- $pairs := list }}
{{- if $cred.existingSecret }}
{{- $pairs = list (list "REGISTRY_USERNAME" $cred.usernameKey) (list "REGISTRY_PASSWORD" $cred.passwordKey) (list "REGISTRY_BEARER_TOKEN" $cred.bearerTokenKey) }}
{{- else if include "passthrough.createSecret" . }}
{{- $pairs = list (list "REGISTRY_USERNAME" (ternary "username" "" (not (empty $cred.username)))) (list "REGISTRY_PASSWORD" (ternary "password" "" (not (empty $cred.password)))) (list "REGISTRY_BEARER_TOKEN" (ternary "token" "" (not (empty $cred.bearerToken)))) }}
{{- end }}
{{- $refs := list }}
{{- range $pairs }}
{{- if index . 1 }}
{{- $refs = append $refs (list (index . 0) $secretName (index . 1)) }}
{{- end }}
{{- end }}
{{- $s3 := .Values.store.s3 }}
{{- if and (eq .Values.store.type "s3") $s3.existingSecret }}
{{- $refs = append $refs (list "AWS_ACCESS_KEY_ID" $s3.existingSecret $s3.accessKeyIdKey) }}
{{- $refs = append $refs (list "AWS_SECRET_ACCESS_KEY" $s3.existingSecret $s3.secretAccessKeyKey) }}
{{- end }}
{{- if .Values.redis.existingSecret }}
{{- $refs = append $refs (list "REDIS_URL" .Values.redis.existingSecret .Values.redis.urlKey) }}
{{- end }}
{{- if include "passthrough.tokenSecretUsed" . }}
{{- $refs = append $refs (list "TOKEN_SECRET" (include "passthrough.tokenSecretName" .) (ternary .Values.v2.tokenSecret.key "TOKEN_SECRET" (not (empty .Values.v2.tokenSecret.existingSecret)))) }}
{{- end }}
{{- toJson $refs }}
{{- end }}

{{/*
A probe from values, its httpGet switched to HTTPS when the service speaks TLS (the
kubelet does not verify the certificate). Called with (list probe tlsEnabled).
*/}}
{{- define "passthrough.probe" -}}
{{- $probe := deepCopy (index . 0) }}
{{- if and (index . 1) (hasKey $probe "httpGet") }}
{{- $_ := set $probe.httpGet "scheme" "HTTPS" }}
{{- end }}
{{- toYaml $probe }}
{{- end }}

{{/*
The container's envFrom, env, volumeMounts and the pod's volumes: one definition for the
Deployment and the gc CronJob, which loads the same settings (and so needs every file
they name: load_settings checks them) and opens the same store.
*/}}
{{- define "passthrough.envFrom" -}}
- configMapRef:
    name: {{ include "passthrough.fullname" . }}
{{- with .Values.extraEnvFrom }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "passthrough.env" -}}
{{- range include "passthrough.secretEnv" . | fromJsonArray }}
- name: {{ index . 0 }}
  valueFrom:
    secretKeyRef:
      name: {{ index . 1 }}
      key: {{ index . 2 | quote }}
{{- end }}
{{- with .Values.extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "passthrough.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: temp
  mountPath: {{ .Values.config.tempDir }}
{{- if and (eq .Values.store.type "filesystem") .Values.config.cacheDir }}
- name: cache
  mountPath: {{ .Values.config.cacheDir }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  mountPath: {{ include "passthrough.tlsDir" . }}
  readOnly: true
{{- end }}
{{- if include "passthrough.authFileSecretName" . }}
- name: registry-auth
  mountPath: {{ include "passthrough.authFileDir" . }}
  readOnly: true
{{- end }}
{{- if include "passthrough.htpasswdSecretName" . }}
- name: htpasswd
  mountPath: {{ include "passthrough.htpasswdDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.hosted.access }}
- name: access
  mountPath: {{ include "passthrough.accessDir" . }}
  readOnly: true
{{- end }}
{{- if .Values.sync.file }}
- name: sync
  mountPath: {{ include "passthrough.syncDir" . }}
  readOnly: true
{{- end }}
{{- if include "passthrough.upstreamCa" . }}
- name: upstream-ca
  mountPath: {{ include "passthrough.upstreamCaDir" . }}
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "passthrough.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.storage.tmp.sizeLimit }}
- name: temp
  emptyDir:
    {{- with .Values.storage.temp.medium }}
    medium: {{ . }}
    {{- end }}
    sizeLimit: {{ .Values.storage.temp.sizeLimit }}
{{- if and (eq .Values.store.type "filesystem") .Values.config.cacheDir }}
- name: cache
  {{- if .Values.persistence.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.existingClaim | default (printf "%s-cache" (include "passthrough.fullname" .)) }}
  {{- else }}
  emptyDir:
    sizeLimit: {{ .Values.storage.cache.sizeLimit }}
  {{- end }}
{{- end }}
{{- if .Values.tls.existingSecret }}
- name: tls
  secret:
    secretName: {{ .Values.tls.existingSecret }}
    # 0440: the key is readable by the pod's group (fsGroup) only.
    defaultMode: 288
    items:
      - key: tls.crt
        path: tls.crt
      - key: tls.key
        path: tls.key
{{- end }}
{{- with include "passthrough.authFileSecretName" . }}
- name: registry-auth
  secret:
    secretName: {{ . }}
    defaultMode: 288
    items:
      - key: {{ ternary $.Values.v2.authFile.key ".dockerconfigjson" (not (empty $.Values.v2.authFile.existingSecret)) | quote }}
        path: auth.json
{{- end }}
{{- with include "passthrough.htpasswdSecretName" . }}
- name: htpasswd
  secret:
    secretName: {{ . }}
    # 0440 like the other secrets; a directory mount (not subPath), so an edit of the
    # Secret reaches the running pods and passthrough reads the file again.
    defaultMode: 288
    items:
      - key: {{ ternary $.Values.hosted.htpasswd.key "htpasswd" (not (empty $.Values.hosted.htpasswd.existingSecret)) | quote }}
        path: htpasswd
{{- end }}
{{- if .Values.hosted.access }}
- name: access
  configMap:
    name: {{ include "passthrough.fullname" . }}-access
    defaultMode: 292
    items:
      - key: access.yaml
        path: access.yaml
{{- end }}
{{- if .Values.sync.file }}
- name: sync
  configMap:
    name: {{ include "passthrough.fullname" . }}-sync
    defaultMode: 292
    items:
      - key: sync.yaml
        path: sync.yaml
{{- end }}
{{- with .Values.upstream.caBundle }}
{{- if .existingConfigMap }}
- name: upstream-ca
  # A directory mount (not subPath): a renewed CA reaches the pods at their next start.
  configMap:
    name: {{ .existingConfigMap }}
    defaultMode: 292
    items:
      - key: {{ .key | quote }}
        path: ca.crt
{{- else if .existingSecret }}
- name: upstream-ca
  secret:
    secretName: {{ .existingSecret }}
    defaultMode: 292
    items:
      - key: {{ .key | quote }}
        path: ca.crt
{{- end }}
{{- end }}
{{- with .Values.extraVolumes }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
The NetworkPolicy egress rules, shared by the server's policy and the gc pods'.
*/}}
{{- define "passthrough.networkPolicyEgress" -}}
{{- $egress := .Values.networkPolicy.egress }}
{{- if $egress.dns }}
# Name resolution.
- ports:
    - port: 53
      protocol: UDP
    - port: 53
      protocol: TCP
{{- end }}
{{- if $egress.registryPorts }}
# Container registries (and their blob CDNs).
- ports:
    {{- range $egress.registryPorts }}
    - port: {{ . }}
      protocol: TCP
    {{- end }}
  {{- with $egress.registries }}
  to:
    {{- toYaml . | nindent 4 }}
  {{- end }}
{{- end }}
{{- with $egress.extra }}
{{ toYaml . }}
{{- end }}
{{- end }}
