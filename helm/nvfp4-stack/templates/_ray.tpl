{{/* Parts of the RayService's pod templates; call with (dict "ctx" $ "node" "head"|"worker"). */}}

{{- define "nvfp4.rayPodMetadata" -}}
labels:
  {{- include "nvfp4.labels" (dict "ctx" .ctx "component" "ray") | nindent 2 }}
  nvfp4-stack/ray-node: {{ .node }}
annotations:
  {{- include "nvfp4.podAnnotations" .ctx | nindent 2 }}
  {{- if .ctx.Values.serve.newClusterOnModelChange }}
  # A new hash changes the Ray cluster spec, so KubeRay brings up a new cluster for a new model.
  checksum/serve-config: {{ include "nvfp4.serveConfig" .ctx | sha256sum }}
  {{- end }}
{{- end }}

{{- define "nvfp4.rayContainer" -}}
{{- $ctx := .ctx -}}
{{- $sc := deepCopy $ctx.Values.securityContext }}
{{- $_ := set $sc "readOnlyRootFilesystem" false -}}
image: {{ include "nvfp4.image" (dict "ctx" $ctx "service" "serve") }}
imagePullPolicy: {{ $ctx.Values.image.pullPolicy }}
envFrom:
  - configMapRef:
      name: {{ include "nvfp4.fullname" $ctx }}
env:
  {{- include "nvfp4.env" $ctx | nindent 2 }}
  # Read by the ingress and re-read when the mounted Secret changes.
  - name: NVFP4_SERVE_API_KEY_FILE
    value: /etc/nvfp4/api-keys/api-keys
  # Read by Ray's processes at start (nvfp4_common.serving.RAY_ENV_DEFAULTS, docs/serving.md).
  - name: RAY_SERVE_THROUGHPUT_OPTIMIZED
    value: {{ ternary "1" "0" $ctx.Values.ray.throughputOptimized | quote }}
  - name: RAY_SERVE_ENABLE_DIRECT_INGRESS
    value: "0"
  - name: RAY_SERVE_PROXY_USE_GRPC
    value: "1"
  - name: RAY_SERVE_LLM_ENABLE_DIRECT_STREAMING
    value: {{ ternary "1" "0" $ctx.Values.ray.directStreaming | quote }}
  - name: RAY_SERVE_ENABLE_HA_PROXY
    value: {{ ternary "1" "0" $ctx.Values.ray.directStreaming | quote }}
  {{- with $ctx.Values.ray.extraEnv }}
  {{- toYaml . | nindent 2 }}
  {{- end }}
securityContext:
  {{- toYaml $sc | nindent 2 }}
volumeMounts:
  {{- include "nvfp4.storageMounts" $ctx | nindent 2 }}
  - name: api-keys
    mountPath: /etc/nvfp4/api-keys
    readOnly: true
  - name: dshm
    mountPath: /dev/shm
{{- end }}

{{- define "nvfp4.rayVolumes" -}}
{{- $ctx := .ctx }}
{{- include "nvfp4.storageVolumes" $ctx }}
- name: api-keys
  secret:
    secretName: {{ include "nvfp4.secretName" $ctx }}
    defaultMode: 0440
    items:
      - key: {{ $ctx.Values.secrets.keys.apiKeys }}
        path: api-keys
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ ternary $ctx.Values.ray.worker.shmSize "1Gi" (eq .node "worker") }}
{{- end }}

{{- define "nvfp4.rayPodSpec" -}}
{{- $ctx := .ctx -}}
{{- $v := index $ctx.Values.ray .node -}}
securityContext:
  {{- toYaml $ctx.Values.podSecurityContext | nindent 2 }}
{{- with $ctx.Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with $v.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
volumes:
  {{- include "nvfp4.rayVolumes" . | nindent 2 }}
{{- end }}

{{/* The Serve config: one application built by nvfp4_serve.app:build_app. */}}
{{- define "nvfp4.serveConfig" -}}
{{- $s := .Values.serve }}
{{- $autoscaling := dict
  "min_replicas" (int $s.autoscaling.minReplicas)
  "max_replicas" (int $s.autoscaling.maxReplicas)
  "target_ongoing_requests" (int $s.autoscaling.targetOngoingRequests) }}
{{- $args := dict
  "model" (printf "/models/%s" $s.modelPath)
  "model_name" ($s.servedModelName | default (base $s.modelPath))
  "max_model_len" (int $s.maxModelLen)
  "gpu_memory_utilization" $s.gpuMemoryUtilization
  "tensor_parallel_size" (int $s.tensorParallelSize)
  "accelerator" "gpu"
  "autoscaling" $autoscaling }}
{{- with $s.engineKwargs }}
{{- $_ := set $args "engine_kwargs" . }}
{{- end }}
{{- $app := dict "name" $s.appName "route_prefix" "/" "import_path" "nvfp4_serve.app:build_app"
  "args" (mergeOverwrite $args $s.extraArgs) }}
{{- toYaml (dict "proxy_location" "EveryNode" "http_options" (dict "host" "0.0.0.0" "port" 8000)
  "applications" (list $app)) }}
{{- end }}

{{/* `ray start` parameters: the user's, then the chart's (GPU count and metrics port win). */}}
{{- define "nvfp4.rayStartParams" -}}
{{- $params := dict }}
{{- range $k, $v := (index .ctx.Values.ray .node).rayStartParams }}
{{- $_ := set $params $k (toString $v) }}
{{- end }}
{{- if eq .node "head" }}
{{- $_ := set $params "dashboard-host" ($params | dig "dashboard-host" "0.0.0.0") }}
{{- end }}
{{- $_ := set $params "num-gpus" (ternary "0" (toString .ctx.Values.ray.worker.gpus) (eq .node "head")) }}
{{- $_ := set $params "metrics-export-port" "8080" }}
{{- toYaml $params }}
{{- end }}
