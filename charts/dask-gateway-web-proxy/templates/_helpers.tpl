{{/*
Names. Template names are global across an umbrella and its sub-charts, so every define
here starts with "dgweb.". Object names are <role>-<release>, cut to 63 characters.
*/}}

{{- define "dgweb.name" -}}
{{- printf "web-proxy-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgweb.publicName" -}}
{{- printf "web-public-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgweb.adminName" -}}
{{- printf "web-api-%s" .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* The release of the dask-gateway-api chart this proxy follows. */}}
{{- define "dgweb.gatewayRelease" -}}
{{- default .Release.Name .Values.gateway.release -}}
{{- end -}}

{{- define "dgweb.apiConfigMap" -}}
{{- printf "gateway-api-%s" (include "dgweb.gatewayRelease" .) | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgweb.tokenSecret" -}}
{{- default (printf "gateway-secret-%s" (include "dgweb.gatewayRelease" .) | trunc 63 | trimSuffix "-") .Values.gateway.proxyTokenSecret.name -}}
{{- end -}}

{{- define "dgweb.image" -}}
{{- printf "%s:%s" .Values.image.name (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{- define "dgweb.chart" -}}
{{- printf "dask-gateway-web-proxy-%s" .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "dgweb.selectorLabels" -}}
app.kubernetes.io/name: dask-gateway-web-proxy
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: web-proxy
{{- end -}}

{{- define "dgweb.labels" -}}
{{ include "dgweb.selectorLabels" . }}
app.kubernetes.io/part-of: dask-gateway
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ include "dgweb.chart" . }}
{{- end -}}

{{/* The proxy's command line; $(DASK_GATEWAY_ROUTES_URL) is expanded by the kubelet. */}}
{{- define "dgweb.args" -}}
- --address=:{{ .Values.port }}
- --admin-address=:{{ .Values.adminPort }}
- --api-url=$(DASK_GATEWAY_ROUTES_URL)
- --api-token-file=/etc/dask-gateway/proxy-token/token
- --log-level={{ .Values.logLevel }}
- --connect-timeout={{ .Values.connectTimeout }}
- --response-timeout={{ .Values.responseTimeout }}
{{- if .Values.tls.secretName }}
- --tls-cert=/etc/dask-gateway/tls/tls.crt
- --tls-key=/etc/dask-gateway/tls/tls.key
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/* Everything that configures the proxy, hashed into checksum/config. */}}
{{- define "dgweb.settings" -}}
args:
{{ include "dgweb.args" . }}
apiUrl: {{ .Values.gateway.apiUrl | quote }}
apiConfigMap: {{ include "dgweb.apiConfigMap" . }}
tokenSecret: {{ include "dgweb.tokenSecret" . }}/{{ .Values.gateway.proxyTokenSecret.key }}
tlsSecret: {{ .Values.tls.secretName | quote }}
{{- end -}}

{{- define "dgweb.podSecurityContext" -}}
runAsNonRoot: true
runAsUser: 1000
runAsGroup: 1000
fsGroup: 1000
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "dgweb.containerSecurityContext" -}}
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
