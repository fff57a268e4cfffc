{{/* Names and labels. */}}
{{- define "sirocco.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "sirocco.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 40 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 40 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{- define "sirocco.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
app.kubernetes.io/name: {{ include "sirocco.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector labels; call with (dict "ctx" $ "component" "router"). */}}
{{- define "sirocco.selectorLabels" -}}
app.kubernetes.io/name: {{ include "sirocco.name" .ctx }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "sirocco.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end }}

{{- define "sirocco.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "sirocco.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "sirocco.clusterName" -}}
{{- default (include "sirocco.fullname" .) .Values.clusterName }}
{{- end }}

{{/* The etcd client endpoints, comma-separated. */}}
{{- define "sirocco.etcdEndpoints" -}}
{{- if .Values.etcd.enabled }}
{{- printf "http://%s-etcd.%s.svc:2379" (include "sirocco.fullname" .) .Release.Namespace }}
{{- else }}
{{- join "," .Values.etcd.endpoints }}
{{- end }}
{{- end }}

{{/* Checks the values beyond what values.schema.json can say; fails with a message. */}}
{{- define "sirocco.validate" -}}
{{- $s := .Values.shard }}
{{- if ne (mod (int $s.tp) (int $s.ranksPerPod)) 0 }}
{{- fail (printf "shard.tp (%d) must be a multiple of shard.ranksPerPod (%d): a replica's %d ranks are placed ranksPerPod to a pod" (int $s.tp) (int $s.ranksPerPod) (int $s.tp)) }}
{{- end }}
{{- if gt (int $s.ranksPerPod) (int $s.tp) }}
{{- fail (printf "shard.ranksPerPod (%d) cannot exceed shard.tp (%d)" (int $s.ranksPerPod) (int $s.tp)) }}
{{- end }}
{{- if and (not .Values.etcd.enabled) (empty .Values.etcd.endpoints) }}
{{- fail "etcd.enabled is false, so etcd.endpoints must list the external etcd's client URLs" }}
{{- end }}
{{- $v := .Values.model.volume }}
{{- if and (eq $v.type "pvc") (empty $v.claimName) }}
{{- fail "model.volume.type is pvc, so model.volume.claimName must name the PersistentVolumeClaim holding the checkpoint" }}
{{- end }}
{{- if and (eq $v.type "hostPath") (empty $v.hostPath) }}
{{- fail "model.volume.type is hostPath, so model.volume.hostPath must name the node directory holding the checkpoint" }}
{{- end }}
{{- if and .Values.model.path (ne $v.type "none") (not (hasPrefix (printf "%s/" (trimSuffix "/" $v.mountPath)) .Values.model.path)) }}
{{- fail (printf "model.path (%s) must lie under model.volume.mountPath (%s)" .Values.model.path $v.mountPath) }}
{{- end }}
{{- if .Values.model.download.enabled }}
{{- if eq $v.type "none" }}
{{- fail "model.download.enabled needs a volume to download into: set model.volume.type to pvc, hostPath or emptyDir" }}
{{- end }}
{{- if not .Values.model.path }}
{{- fail "model.download.enabled needs model.path: the directory to download the checkpoint into" }}
{{- end }}
{{- end }}
{{- if gt (add (int $s.grpcPort) (int $s.ranksPerPod)) 65536 }}
{{- fail "shard.grpcPort + shard.ranksPerPod exceeds 65535" }}
{{- end }}
{{- end }}

{{/* The model volume (none when model.volume.type is none). */}}
{{- define "sirocco.modelVolume" -}}
{{- $v := .Values.model.volume }}
{{- if eq $v.type "pvc" }}
- name: model
  persistentVolumeClaim:
    claimName: {{ $v.claimName }}
    readOnly: {{ not .Values.model.download.enabled }}
{{- else if eq $v.type "hostPath" }}
- name: model
  hostPath:
    path: {{ $v.hostPath }}
    type: {{ ternary "DirectoryOrCreate" "Directory" .Values.model.download.enabled }}
{{- else if eq $v.type "emptyDir" }}
- name: model
  emptyDir:
    sizeLimit: {{ $v.sizeLimit }}
{{- end }}
{{- end }}

{{- define "sirocco.modelMount" -}}
{{- if ne .Values.model.volume.type "none" }}
- name: model
  mountPath: {{ .Values.model.volume.mountPath }}
  readOnly: true
{{- end }}
{{- end }}

{{/* The init container that fetches the checkpoint (model.download). */}}
{{- define "sirocco.downloadInit" -}}
{{- if .Values.model.download.enabled }}
- name: fetch-model
  image: {{ .Values.model.download.image }}
  imagePullPolicy: IfNotPresent
  # Skips the download when the checkpoint is already there (a PVC or hostPath).
  command: ["/bin/sh", "-c"]
  args:
    - |
      set -eu
      if [ -f "$MODEL_PATH/config.json" ]; then echo "checkpoint present in $MODEL_PATH"; exit 0; fi
      pip install --quiet --no-cache-dir --target /tmp/hf huggingface_hub
      PYTHONPATH=/tmp/hf python -c 'import os; from huggingface_hub import snapshot_download; snapshot_download(os.environ["HF_REPO"], revision=os.environ["HF_REVISION"], local_dir=os.environ["MODEL_PATH"] + ".partial-" + os.environ["HOSTNAME"], allow_patterns=["*.json", "*.safetensors", "tokenizer.model"])'
      # Pods downloading at once each use their own directory; the first to finish wins.
      if [ -e "$MODEL_PATH" ]; then rm -rf "$MODEL_PATH.partial-$HOSTNAME"; else mv "$MODEL_PATH.partial-$HOSTNAME" "$MODEL_PATH"; fi
  env:
    - {name: MODEL_PATH, value: {{ .Values.model.path | quote }}}
    - {name: HF_REPO, value: {{ .Values.model.download.repo | quote }}}
    - {name: HF_REVISION, value: {{ .Values.model.download.revision | quote }}}
    - {name: HOME, value: /tmp}
    {{- if .Values.model.download.tokenSecret }}
    - name: HF_TOKEN
      valueFrom:
        secretKeyRef: {name: {{ .Values.model.download.tokenSecret }}, key: HF_TOKEN}
    {{- end }}
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  volumeMounts:
    - {name: model, mountPath: {{ .Values.model.volume.mountPath }}}
    - {name: tmp, mountPath: /tmp}
{{- end }}
{{- end }}
