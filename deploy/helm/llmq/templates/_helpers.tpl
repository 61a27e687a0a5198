{{/* Names, labels and the environment shared by the chart's templates. */}}

{{- define "llmq.fullname" -}}
{{- if contains "llmq" .Release.Name -}}
{{- .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-llmq" .Release.Name | trunc 40 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Selector labels of one component: (dict "root" $ "component" "gateway"). */}}
{{- define "llmq.selector" -}}
app.kubernetes.io/name: llmq
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "llmq.labels" -}}
{{ include "llmq.selector" . }}
app.kubernetes.io/version: {{ .root.Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .root.Chart.Name .root.Chart.Version }}
{{- end -}}

{{- define "llmq.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{- define "llmq.secretName" -}}
{{- .Values.secrets.existingSecret | default (printf "%s-secrets" (include "llmq.fullname" .)) -}}
{{- end -}}

{{- define "llmq.domain" -}}
{{ .Release.Namespace }}.svc.{{ .Values.clusterDomain | default "cluster.local" }}
{{- end -}}

{{/* A pod's DNS name in a StatefulSet: (dict "root" $ "set" "redis" "i" 0). */}}
{{- define "llmq.podHost" -}}
{{- $full := include "llmq.fullname" .root -}}
{{ $full }}-{{ .set }}-{{ .i }}.{{ $full }}-{{ .set }}-headless.{{ include "llmq.domain" .root }}
{{- end -}}

{{- define "llmq.sentinels" -}}
{{- $out := list -}}
{{- range $i := until 3 -}}
{{- $out = append $out (printf "%s:26379" (include "llmq.podHost" (dict "root" $ "set" "sentinel" "i" $i))) -}}
{{- end -}}
{{ join "," $out }}
{{- end -}}

{{/* A value of the Secret: (dict "root" $ "key" "vllm-api-key"). */}}
{{- define "llmq.secretRef" -}}
valueFrom:
  secretKeyRef:
    name: {{ include "llmq.secretName" .root }}
    key: {{ .key }}
{{- end -}}

{{/* The Redis connection of a gateway or worker, and the payload keys that seal what they
write there: (dict "root" $ "role" "gateway"). */}}
{{- define "llmq.redisEnv" -}}
{{- $r := .root.Values.redis -}}
{{- $full := include "llmq.fullname" .root -}}
{{- if eq $r.mode "external" }}
- name: REDIS_URL
  value: {{ $r.external.url | default "redis://unused:6379/0" | quote }}
- name: REDIS_USERNAME
  value: {{ ternary $r.external.gatewayUsername $r.external.workerUsername (eq .role "gateway") | quote }}
{{- if $r.external.sentinels }}
- name: REDIS_SENTINELS
  value: {{ $r.external.sentinels | quote }}
- name: REDIS_SENTINEL_MASTER
  value: {{ $r.external.sentinelMaster | quote }}
- name: REDIS_SENTINEL_PASSWORD
  {{- include "llmq.secretRef" (dict "root" .root "key" "redis-sentinel-password") | nindent 2 }}
{{- end }}
{{- else }}
- name: REDIS_URL
  value: {{ printf "redis://%s-redis.%s:6379/0" $full (include "llmq.domain" .root) | quote }}
- name: REDIS_USERNAME
  value: {{ .role }}
{{- if eq $r.mode "sentinel" }}
- name: REDIS_SENTINELS
  value: {{ include "llmq.sentinels" .root | quote }}
- name: REDIS_SENTINEL_MASTER
  value: mymaster
- name: REDIS_SENTINEL_PASSWORD
  {{- include "llmq.secretRef" (dict "root" .root "key" "redis-sentinel-password") | nindent 2 }}
{{- end }}
{{- end }}
- name: REDIS_PASSWORD
  {{- include "llmq.secretRef" (dict "root" .root "key" (printf "redis-%s-password" .role)) | nindent 2 }}
- name: REDIS_MIN_REPLICAS_ACK
  value: {{ $r.minReplicasToWrite | quote }}
- name: PAYLOAD_KEYS
  {{- include "llmq.secretRef" (dict "root" .root "key" "payload-keys") | nindent 2 }}
{{- end -}}

{{/* The settings every gateway and worker shares (values.config and what models imply). */}}
{{- define "llmq.appEnv" -}}
{{- $places := dict -}}
{{- $cold := list -}}
{{- range .Values.models -}}
{{- $served := .servedName | default .name -}}
{{- if hasKey . "queueMax" }}{{ $_ := set $places $served (int .queueMax) }}{{ end -}}
{{- if and $.Values.keda.enabled (eq (int (dig "autoscaling" "minReplicas" 1 .)) 0) -}}
{{- $cold = append $cold $served -}}
{{- end -}}
{{- end -}}
{{- range $name, $value := .Values.config }}
- name: {{ $name }}
  value: {{ $value | toString | quote }}
{{- end }}
- name: QUEUE_MAX_PER_MODEL
  value: {{ $places | toJson | quote }}
- name: MODEL_ALIASES
  value: {{ .Values.modelAliases | toJson | quote }}
- name: SCALE_TO_ZERO_MODELS
  value: {{ join "," $cold | quote }}
{{- with .Values.tracing }}
{{- if .endpoint }}
- name: OTEL_EXPORTER_OTLP_ENDPOINT
  value: {{ .endpoint | quote }}
- name: OTEL_EXPORTER_OTLP_PROTOCOL
  value: {{ .protocol | default "http/protobuf" | quote }}
- name: OTEL_TRACES_SAMPLER
  value: {{ .sampler | default "parentbased_traceidratio" | quote }}
- name: OTEL_TRACES_SAMPLER_ARG
  value: {{ .samplerArg | default "0.1" | toString | quote }}
{{- if .resourceAttributes }}
- name: OTEL_RESOURCE_ATTRIBUTES
  value: {{ .resourceAttributes | quote }}
{{- end }}
- name: TRACE_CONTENT
  value: {{ .content | default false | toString | quote }}
{{- end }}
{{- end }}
{{- end -}}

{{/* Container settings for the project's image (non-root, read-only). */}}
{{- define "llmq.appContainer" -}}
image: {{ include "llmq.image" . }}
imagePullPolicy: {{ .Values.image.pullPolicy }}
securityContext:
  {{- toYaml (merge (dict "runAsNonRoot" true "runAsUser" .Values.podSecurityContext.runAsUser) .Values.securityContext) | nindent 2 }}
{{- end -}}

{{/* The model's served name. */}}
{{- define "llmq.served" -}}
{{ .servedName | default .name }}
{{- end -}}

{{/* The scaling query of a model: (dict "root" $ "model" .). */}}
{{- define "llmq.scalingQuery" -}}
max(api_model_desired_workers{job="gateway",namespace="{{ .root.Release.Namespace }}",llmq_release="{{ .root.Release.Name }}",model="{{ include "llmq.served" .model }}"})
{{- end -}}
