{{/*
Names. Template names are global across an umbrella and its sub-charts, so every define
here starts with "dgapi.". Object names follow the classic chart: <role>-<release>, cut to
63 characters (the DNS label limit).
*/}}

{{- define "dgapi.name" -}}
{{- printf "gateway-api-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgapi.secretName" -}}
{{- printf "gateway-secret-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgapi.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "dgapi.name" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "dgapi.backendNamespace" -}}
{{- default .Release.Namespace .Values.backend.namespace -}}
{{- end -}}

{{/* The path prefix without a trailing slash ("" or "/x/y"). */}}
{{- define "dgapi.prefix" -}}
{{- .Values.prefix | trimSuffix "/" -}}
{{- end -}}

{{/* Where schedulers reach the API (spec 5.1: ends in /api), from any namespace. */}}
{{- define "dgapi.apiUrl" -}}
{{- printf "http://%s.%s:%d%s/api" (include "dgapi.name" .) .Release.Namespace (int .Values.port) (include "dgapi.prefix" .) -}}
{{- end -}}

{{/* The route feed URL the proxies of this namespace follow. */}}
{{- define "dgapi.routesUrl" -}}
{{- printf "http://%s:%d%s/api/v1/routes" (include "dgapi.name" .) (int .Values.port) (include "dgapi.prefix" .) -}}
{{- end -}}

{{- define "dgapi.image" -}}
{{- printf "%s:%s" .Values.image.name (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dgapi.chart" -}}
{{- printf "dask-gateway-api-%s" .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgapi.selectorLabels" -}}
app.kubernetes.io/name: dask-gateway-api
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: api
{{- end -}}

{{- define "dgapi.labels" -}}
{{ include "dgapi.selectorLabels" . }}
app.kubernetes.io/part-of: dask-gateway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "dgapi.chart" . }}
{{- end -}}

{{/* A missing token fails the whole rendering with this message. */}}
{{- define "dgapi.proxyToken" -}}
{{- required "proxyToken is required (gateway.proxyToken in the dask-gateway chart): the proxies use it to follow the API's routes. Generate one with `openssl rand -hex 32` and pass it with --set gateway.proxyToken=... or in your config.yaml." .Values.proxyToken -}}
{{- end -}}

{{/* Secret keys, present only when their value is set. */}}
{{- define "dgapi.hasPassword" -}}
{{- if and (eq .Values.auth.type "simple") .Values.auth.simple.password -}}true{{- end -}}
{{- end -}}
{{- define "dgapi.hasHubToken" -}}
{{- if and (eq .Values.auth.type "jupyterhub") .Values.auth.jupyterhub.apiToken -}}true{{- end -}}
{{- end -}}
{{- define "dgapi.hasKeytab" -}}
{{- if and (eq .Values.auth.type "kerberos") .Values.auth.kerberos.keytab -}}true{{- end -}}
{{- end -}}

{{- define "dgapi.keytabPath" -}}/etc/dask-gateway/kerberos/dask_gateway.keytab{{- end -}}

{{/*
The API's configuration file (docs/configuration.md), secrets excluded: they reach the
process as DASK_GATEWAY_* environment variables from the Secret.
*/}}
{{- define "dgapi.config" -}}
{{- $v := .Values -}}
{{- $auth := dict "type" $v.auth.type "cookie_max_age" $v.auth.cookieMaxAge -}}
{{- if eq $v.auth.type "jupyterhub" -}}
{{- $_ := set $auth "jupyterhub_api_url" (default "http://hub:8081/hub/api" $v.auth.jupyterhub.apiUrl) -}}
{{- if $v.auth.jupyterhub.serviceName -}}
{{- $_ := set $auth "jupyterhub_service_name" $v.auth.jupyterhub.serviceName -}}
{{- end -}}
{{- else if eq $v.auth.type "kerberos" -}}
{{- $_ := set $auth "kerberos_service_name" $v.auth.kerberos.serviceName -}}
{{- $_ := set $auth "kerberos_keytab" (include "dgapi.keytabPath" .) -}}
{{- end -}}
{{- $b := $v.backend -}}
{{- $kube := dict
  "instance" .Release.Name
  "namespace" (include "dgapi.backendNamespace" .)
  "image" (printf "%s:%s" $b.image.name (default .Chart.AppVersion $b.image.tag))
  "image_pull_policy" $b.image.pullPolicy
  "image_pull_secrets" (deepCopy $b.imagePullSecrets)
  "node_selector" (deepCopy $b.nodeSelector)
  "tolerations" (deepCopy $b.tolerations)
  "scheduler_extra_pod_config" (deepCopy $b.scheduler.extraPodConfig)
  "scheduler_extra_container_config" (deepCopy $b.scheduler.extraContainerConfig)
  "worker_extra_pod_config" (deepCopy $b.worker.extraPodConfig)
  "worker_extra_container_config" (deepCopy $b.worker.extraContainerConfig)
-}}
{{- if $b.serviceAccount -}}
{{- $_ := set $kube "service_account" $b.serviceAccount -}}
{{- end -}}
{{- $kube = mergeOverwrite $kube (deepCopy $b.kubernetes) -}}
{{- $cluster := dict
  "scheduler_cores" $b.scheduler.cores
  "scheduler_memory" $b.scheduler.memory
  "worker_cores" $b.worker.cores
  "worker_memory" $b.worker.memory
  "environment" (deepCopy $b.environment)
-}}
{{- if not (kindIs "invalid" $b.worker.threads) -}}
{{- $_ := set $cluster "worker_threads" $b.worker.threads -}}
{{- end -}}
{{- $cluster = mergeOverwrite $cluster (deepCopy $v.cluster) -}}
{{- $cfg := dict
  "address" (printf ":%d" (int $v.port))
  "api_url" (include "dgapi.apiUrl" .)
  "internal_url" (printf "http://%s.%s:%d" (include "dgapi.name" .) .Release.Namespace (int .Values.port))
  "prefix" (include "dgapi.prefix" .)
  "db_path" "/var/lib/dask-gateway/gateway.sqlite"
  "log_level" $v.logLevel
  "auth" $auth
  "backend" (dict "type" $b.type "kubernetes" $kube)
  "cluster" $cluster
-}}
{{- if $v.publicUrl -}}
{{- $_ := set $cfg "public_url" ($v.publicUrl | trimSuffix "/") -}}
{{- end -}}
{{- $d := $v.dashboards | default dict -}}
{{- $dash := dict "auth" (default "owner" $d.auth) -}}
{{- $hubOAuth := $d.jupyterhub | default dict -}}
{{- if $hubOAuth.authorizeUrl -}}
{{- $_ := set $dash "oauth_authorize_url" $hubOAuth.authorizeUrl -}}
{{- end -}}
{{- if $hubOAuth.clientId -}}
{{- $_ := set $dash "oauth_client_id" $hubOAuth.clientId -}}
{{- end -}}
{{- if $hubOAuth.redirectUri -}}
{{- $_ := set $dash "oauth_redirect_uri" $hubOAuth.redirectUri -}}
{{- end -}}
{{- $_ := set $cfg "dashboards" $dash -}}
{{- if $v.userLimits -}}
{{- $_ := set $cfg "user_limits" (deepCopy $v.userLimits) -}}
{{- end -}}
{{- if $v.clusterOptions -}}
{{- $_ := set $cfg "options" (deepCopy $v.clusterOptions) -}}
{{- end -}}
{{- $cfg = mergeOverwrite $cfg (deepCopy $v.extraConfig) -}}
{{- toYaml $cfg -}}
{{- end -}}

{{- define "dgapi.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dgapi.containerSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
