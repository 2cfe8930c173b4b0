{{/* Names and labels shared by every template. */}}

{{- define "tasker.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tasker.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component: (dict "ctx" $ "component" "worker") */}}
{{- define "tasker.selectorLabels" -}}
app.kubernetes.io/name: {{ .ctx.Chart.Name }}
app.kubernetes.io/instance: {{ .ctx.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tasker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}

{{/* The Secret the pods read: the chart's own, or an existing one. */}}
{{- define "tasker.secretName" -}}
{{- if .Values.secret.create -}}
{{- include "tasker.fullname" . -}}
{{- else -}}
{{- required "set existingSecret to the name of a Secret with DATABASE_URL and AMQP_URL, or secret.create=true" .Values.existingSecret -}}
{{- end -}}
{{- end -}}

{{/* Spread a component's pods over nodes and zones unless the values give a list. */}}
{{- define "tasker.topologySpread" -}}
{{- if .values.topologySpreadConstraints }}
{{- toYaml .values.topologySpreadConstraints }}
{{- else }}
{{- range list "kubernetes.io/hostname" "topology.kubernetes.io/zone" }}
- maxSkew: 1
  topologyKey: {{ . }}
  whenUnsatisfiable: ScheduleAnyway
  labelSelector:
    matchLabels:
      {{- include "tasker.selectorLabels" (dict "ctx" $.ctx "component" $.component) | nindent 6 }}
{{- end }}
{{- end }}
{{- end -}}

{{/* The KEDA queue pattern: the value, else the worker's namespaces, else every step queue. */}}
{{- define "tasker.queuePattern" -}}
{{- $prefix := regexQuoteMeta (default "tasker" .Values.config.TASKER_AMQP_PREFIX) -}}
{{- if .Values.keda.queuePattern -}}
{{- .Values.keda.queuePattern -}}
{{- else if .Values.worker.namespaces -}}
{{- $names := list -}}
{{- range splitList "," .Values.worker.namespaces -}}
{{- $names = append $names (regexQuoteMeta (trim .)) -}}
{{- end -}}
{{- printf "^%s\\.steps\\.(%s)$" $prefix (join "|" $names) -}}
{{- else -}}
{{- printf "^%s\\.steps\\..+$" $prefix -}}
{{- end -}}
{{- end -}}
