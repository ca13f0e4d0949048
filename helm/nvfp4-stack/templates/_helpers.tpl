{{/* Names, labels and images shared by every template. Pod parts live in _pod.tpl. */}}

{{- define "nvfp4.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* `<release>-nvfp4-stack`, or the release name when it already contains the chart name. */}}
{{- define "nvfp4.fullname" -}}
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

{{/* KubeRay appends `-<5 chars>` for the cluster and `-head-svc` for services: keep room. */}}
{{- define "nvfp4.rayServiceName" -}}
{{- include "nvfp4.fullname" . | trunc 40 | trimSuffix "-" }}
{{- end }}

{{/* The worker Deployment: the admin toolbox's Role and `nvfp4ctl workers scale` name it. */}}
{{- define "nvfp4.workerDeploymentName" -}}
{{- printf "%s-worker" (include "nvfp4.fullname" .) }}
{{- end }}

{{/* Call with (dict "ctx" $ "component" "worker"). */}}
{{- define "nvfp4.selectorLabels" -}}
app.kubernetes.io/name: {{ include "nvfp4.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "nvfp4.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .ctx.Chart.Name .ctx.Chart.Version | replace "+" "_" }}
{{ include "nvfp4.selectorLabels" . }}
app.kubernetes.io/version: {{ .ctx.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: nvfp4-stack
app.kubernetes.io/managed-by: {{ .ctx.Release.Service }}
{{- end }}

{{/* Call with (dict "ctx" $ "service" "serve"). */}}
{{- define "nvfp4.image" -}}
{{- printf "%s/%s:%s" .ctx.Values.image.registry .service (.ctx.Values.image.tag | default .ctx.Chart.AppVersion) }}
{{- end }}

{{- define "nvfp4.secretName" -}}
{{- .Values.secrets.existingSecret | default (include "nvfp4.fullname" .) }}
{{- end }}

{{/* KubeRay reads the Ray token from this key of authOptions.secretName; it is not configurable. */}}
{{- define "nvfp4.rayAuthTokenKey" -}}
auth_token
{{- end }}

{{- define "nvfp4.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}{{ .Values.serviceAccount.name | default (include "nvfp4.fullname" .) }}
{{- else }}{{ .Values.serviceAccount.name | default "default" }}{{ end }}
{{- end }}
