{{/*
Names. Template names are global across an umbrella and its sub-charts, so every define
here starts with "dgsched.". Object names are <role>-<release>, cut to 63 characters.
*/}}

{{- define "dgsched.name" -}}
{{- printf "scheduler-proxy-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgsched.publicName" -}}
{{- printf "scheduler-public-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgsched.adminName" -}}
{{- printf "scheduler-api-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release of the dask-gateway-api chart this proxy follows. */}}
{{- define "dgsched.gatewayRelease" -}}
{{- default .Release.Name .Values.gateway.release -}}
{{- end -}}

{{- define "dgsched.apiConfigMap" -}}
{{- printf "gateway-api-%s" (include "dgsched.gatewayRelease" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgsched.tokenSecret" -}}
{{- default (printf "gateway-secret-%s" (include "dgsched.gatewayRelease" .) | trunc 63 | trimSuffix "-") .Values.gateway.proxyTokenSecret.name -}}
{{- end -}}

{{- define "dgsched.image" -}}
{{- printf "%s:%s" .Values.image.name (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dgsched.chart" -}}
{{- printf "dask-gateway-scheduler-proxy-%s" .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgsched.selectorLabels" -}}
app.kubernetes.io/name: dask-gateway-scheduler-proxy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: scheduler-proxy
{{- end -}}

{{- define "dgsched.labels" -}}
{{ include "dgsched.selectorLabels" . }}
app.kubernetes.io/part-of: dask-gateway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "dgsched.chart" . }}
{{- end -}}

{{/* The proxy's command line; $(DASK_GATEWAY_ROUTES_URL) is expanded by the kubelet. */}}
{{- define "dgsched.args" -}}
- --address=:{{ .Values.port }}
- --admin-address=:{{ .Values.adminPort }}
- --api-url=$(DASK_GATEWAY_ROUTES_URL)
- --api-token-file=/etc/dask-gateway/proxy-token/token
- --log-level={{ .Values.logLevel }}
- --hello-timeout={{ .Values.helloTimeout }}
- --connect-timeout={{ .Values.connectTimeout }}
- --workers={{ .Values.workers }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Everything that configures the proxy, hashed into checksum/config. */}}
{{- define "dgsched.settings" -}}
args:
{{ include "dgsched.args" . }}
apiUrl: {{ .Values.gateway.apiUrl | quote }}
apiConfigMap: {{ include "dgsched.apiConfigMap" . }}
tokenSecret: {{ include "dgsched.tokenSecret" . }}/{{ .Values.gateway.proxyTokenSecret.key }}
{{- end -}}

{{- define "dgsched.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dgsched.containerSecurityContext" -}}
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
