{{/*
KubeRay's name limits: a RayCluster name is at most 53 characters (63 minus "-serve-svc", its
longest Service suffix) and a RayService's at most 47, because KubeRay appends 6 characters
("-" and 5 random ones) to name the RayService's RayCluster. It must also be a DNS-1035 label.
*/}}
{{- define "sdserve.maxNameLength" -}}47{{- end }}

{{- define "sdserve.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/*
The RayService's name, which every other resource is named after. "<release>-<chart>" when it
fits, else the release name alone; a name that still does not fit is an error rather than a
silent truncation, which could make two releases in one namespace share names.
*/}}
{{- define "sdserve.fullname" -}}
{{- $max := include "sdserve.maxNameLength" . | int }}
{{- $name := "" }}
{{- if .Values.fullnameOverride }}
{{- $name = .Values.fullnameOverride }}
{{- else }}
{{- $chart := include "sdserve.name" . }}
{{- $name = printf "%s-%s" .Release.Name $chart }}
{{- if or (contains $chart .Release.Name) (gt (len $name) $max) }}
{{- $name = .Release.Name }}
{{- end }}
{{- end }}
{{- if gt (len $name) $max }}
{{- fail (printf "the RayService name %q is %d characters; KubeRay allows at most %d (it appends 6 to name the RayCluster, whose serve Service must fit 63). Use a shorter release name or set fullnameOverride." $name (len $name) $max) }}
{{- end }}
{{- if not (regexMatch "^[a-z]([-a-z0-9]*[a-z0-9])?$" $name) }}
{{- fail (printf "the RayService name %q is not a DNS-1035 label (lowercase letters, digits and '-', starting with a letter). Use another release name or set fullnameOverride." $name) }}
{{- end }}
{{- $name }}
{{- end }}

{{- define "sdserve.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sdserve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sdserve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "sdserve.labels" -}}
helm.sh/chart: {{ include "sdserve.chart" . }}
{{ include "sdserve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: sdserve
{{- end }}

{{- define "sdserve.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{- define "sdserve.rayVersion" -}}
{{- index .Chart.Annotations "sdserve.io/ray-version" }}
{{- end }}

{{- define "sdserve.secretName" -}}
{{- default (include "sdserve.fullname" .) .Values.existingSecret }}
{{- end }}

{{/* The in-cluster address of KubeRay's serve Service for this RayService. */}}
{{- define "sdserve.serveUrl" -}}
{{- printf "http://%s-serve-svc.%s.svc:8000" (include "sdserve.fullname" .) .Release.Namespace }}
{{- end }}

{{/* SDSERVE_MODELS: model_id -> absolute folder, as JSON. */}}
{{- define "sdserve.modelsJson" -}}
{{- $models := dict }}
{{- range $id, $folder := .Values.models.paths }}
{{- $_ := set $models $id (printf "%s/%s" (trimSuffix "/" $.Values.models.mountPath) $folder) }}
{{- end }}
{{- toJson $models }}
{{- end }}

{{/*
The Serve config (serveConfigV2): the repository's serve_config.yaml with the chart's
documented overrides (listen on all interfaces; args from serve.args). tests/deploy checks that
it matches serve_config.yaml apart from those.
*/}}
{{- define "sdserve.serveConfig" -}}
http_options:
  host: 0.0.0.0
  port: 8000
applications:
  - name: sdserve
    route_prefix: /
    import_path: service.serving.app:build_app
    args:
      {{- toYaml .Values.serve.args | nindent 6 }}
{{- end }}

{{/* Environment of every Ray container (head, workers): the builder runs on the cluster too. */}}
{{- define "sdserve.env" -}}
- name: SDSERVE_MODELS
  value: {{ include "sdserve.modelsJson" . | quote }}
- name: SDSERVE_DATABASE_URL
  valueFrom:
    secretKeyRef:
      name: {{ include "sdserve.secretName" . }}
      key: database-url
- name: SDSERVE_ADMIN_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "sdserve.secretName" . }}
      key: admin-key
- name: SDSERVE_WEBHOOK_SECRET
  valueFrom:
    secretKeyRef:
      name: {{ include "sdserve.secretName" . }}
      key: webhook-secret
      optional: true
- name: SDSERVE_DEMO_KEY
  value: {{ .Values.demoKey | quote }}
- name: SDSERVE_PUBLIC_BASE_URL
  value: {{ default (include "sdserve.serveUrl" .) .Values.publicBaseUrl | quote }}
- name: SDSERVE_IMAGE_STORE_URL
  value: {{ .Values.imageStore.url | quote }}
{{- with .Values.imageStore.s3 }}
{{- if .endpointUrl }}
- name: AWS_ENDPOINT_URL
  value: {{ .endpointUrl | quote }}
{{- end }}
{{- if .region }}
- name: AWS_DEFAULT_REGION
  value: {{ .region | quote }}
{{- end }}
{{- if .credentialsFromSecret }}
- name: AWS_ACCESS_KEY_ID
  valueFrom:
    secretKeyRef:
      name: {{ include "sdserve.secretName" $ }}
      key: aws-access-key-id
- name: AWS_SECRET_ACCESS_KEY
  valueFrom:
    secretKeyRef:
      name: {{ include "sdserve.secretName" $ }}
      key: aws-secret-access-key
{{- end }}
{{- end }}
- name: HF_HUB_OFFLINE
  value: "1"
{{- with .Values.env }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{/*
Checks of values that the schema cannot express; each fails with what to change.
*/}}
{{- define "sdserve.validate" -}}
{{- $args := .Values.serve.args }}
{{- $gpus := .Values.workers.gpus | float64 }}
{{- $perReplica := (default 0 $args.generator_num_gpus) | float64 }}
{{- if and (gt $perReplica 0.0) (eq $gpus 0.0) }}
{{- fail "serve.args.generator_num_gpus is above 0 but workers.gpus is 0: no worker could host a generator replica. Set workers.gpus, or generator_num_gpus: 0 for CPU." }}
{{- end }}
{{- if gt $perReplica $gpus }}
{{- fail (printf "serve.args.generator_num_gpus (%v) is more than a worker has (workers.gpus: %v)." $perReplica $gpus) }}
{{- end }}
{{- if gt (int .Values.workers.minReplicas) (int .Values.workers.maxReplicas) }}
{{- fail "workers.minReplicas is above workers.maxReplicas." }}
{{- end }}
{{- if or (lt (int .Values.workers.replicas) (int .Values.workers.minReplicas)) (gt (int .Values.workers.replicas) (int .Values.workers.maxReplicas)) }}
{{- fail "workers.replicas must lie between workers.minReplicas and workers.maxReplicas." }}
{{- end }}
{{- with $args.generator_autoscaling }}
{{- if gt (int (default 1 .min_replicas)) (int (default 1 .max_replicas)) }}
{{- fail "serve.args.generator_autoscaling: min_replicas is above max_replicas." }}
{{- end }}
{{- end }}
{{- /* Generator replicas the workers can ever host; more would stay pending for good. */}}
{{- if gt $perReplica 0.0 }}
{{- $workers := ternary .Values.workers.maxReplicas .Values.workers.replicas .Values.autoscaler.enabled | int }}
{{- $hosted := mul $workers (floor (divf $gpus $perReplica) | int) }}
{{- $wanted := int (default 1 $args.generator_replicas) }}
{{- with $args.generator_autoscaling }}
{{- $wanted = int (default 1 .max_replicas) }}
{{- end }}
{{- if lt $hosted $wanted }}
{{- fail (printf "%d generator replicas asked for (serve.args), but the workers host at most %d (%s %d x floor(workers.gpus / generator_num_gpus)): raise them or lower the replicas." $wanted $hosted (ternary "workers.maxReplicas" "workers.replicas, the autoscaler being off," .Values.autoscaler.enabled) $workers) }}
{{- end }}
{{- end }}
{{- if and (eq .Values.models.source "image") (ne (trimSuffix "/" .Values.models.mountPath) "/home/ray/models") }}
{{- fail "models.source is \"image\": the Dockerfile bakes the folders into /home/ray/models; set models.mountPath to it." }}
{{- end }}
{{- with .Values.workers.compileCache }}
{{- if and (eq .type "pvc") (not .existingClaim) }}
{{- fail "workers.compileCache.type is \"pvc\" but workers.compileCache.existingClaim is empty: name a ReadWriteMany claim, or use type emptyDir." }}
{{- end }}
{{- if and (ne .type "none") (hasPrefix (printf "%s/" (trimSuffix "/" $.Values.models.mountPath)) (printf "%s/" (trimSuffix "/" .mountPath))) }}
{{- fail "workers.compileCache.mountPath lies in models.mountPath, which is mounted read-only: choose another folder." }}
{{- end }}
{{- end }}
{{- if and (eq .Values.models.source "pvc") (not .Values.models.existingClaim) }}
{{- fail "models.source is \"pvc\" but models.existingClaim is empty: name the PersistentVolumeClaim holding the weights." }}
{{- end }}
{{- if not .Values.existingSecret }}
{{- if not .Values.database.url }}
{{- fail "database.url is required (or existingSecret with a database-url key): e.g. postgresql+psycopg://sdserve:PASSWORD@postgresql:5432/sdserve" }}
{{- end }}
{{- if and .Values.imageStore.s3.credentialsFromSecret (not (and .Values.imageStore.s3.accessKeyId .Values.imageStore.s3.secretAccessKey)) }}
{{- fail "imageStore.s3.credentialsFromSecret needs imageStore.s3.accessKeyId and secretAccessKey (or existingSecret)." }}
{{- end }}
{{- end }}
{{- if not .Values.imageStore.url }}
{{- fail "imageStore.url is required: s3://bucket/prefix (or a local folder such as /home/ray/data/images with one ingress replica)." }}
{{- end }}
{{- end }}
