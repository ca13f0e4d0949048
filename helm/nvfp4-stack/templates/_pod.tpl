{{/* Pod parts shared by the worker, the Ray pods and the admin toolbox. */}}

{{/* NVFP4_REDIS_URL with the password spliced in by Kubernetes from $(REDIS_PASSWORD). */}}
{{- define "nvfp4.redisUrl" -}}
{{- if .Values.redis.enabled }}
{{- printf "redis://:$(REDIS_PASSWORD)@%s-redis:6379/0" (include "nvfp4.fullname" .) }}
{{- else }}
{{- $url := required "redis.externalUrl is required when redis.enabled=false" .Values.redis.externalUrl | urlParse }}
{{- if or (not (has $url.scheme (list "redis" "rediss"))) (not $url.host) }}
{{- fail (printf "redis.externalUrl %q must look like redis://HOST:PORT/DB (or rediss://)" .Values.redis.externalUrl) }}
{{- end }}
{{- if $url.userinfo }}
{{- fail "redis.externalUrl must not contain credentials: put the password in the Secret (secrets.redisPassword or secrets.existingSecret)" }}
{{- end }}
{{- printf "%s://:$(REDIS_PASSWORD)@%s%s" $url.scheme $url.host ($url.path | default "/0") }}
{{- end }}
{{- end }}

{{- define "nvfp4.env" -}}
- name: REDIS_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "nvfp4.secretName" . }}
      key: {{ .Values.secrets.keys.redisPassword }}
- name: NVFP4_REDIS_URL
  value: {{ include "nvfp4.redisUrl" . | quote }}
- name: HF_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "nvfp4.secretName" . }}
      key: {{ .Values.secrets.keys.hfToken }}
      optional: true
{{- end }}

{{- define "nvfp4.podAnnotations" -}}
checksum/config: {{ include (print .Template.BasePath "/configmap.yaml") . | sha256sum }}
{{- end }}

{{- define "nvfp4.storageVolumes" -}}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.models.existingClaim | default (printf "%s-models" (include "nvfp4.fullname" .)) }}
- name: hf-cache
{{- if .Values.persistence.hfCache.enabled }}
  persistentVolumeClaim:
    claimName: {{ .Values.persistence.hfCache.existingClaim | default (printf "%s-hf-cache" (include "nvfp4.fullname" .)) }}
{{- else }}
  emptyDir: {}
{{- end }}
{{- end }}

{{- define "nvfp4.storageMounts" -}}
- name: models
  mountPath: /models
- name: hf-cache
  mountPath: /hf-cache
{{- end }}
