{{/* Names and labels. */}}
{{- define "cascade.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* The components this mode runs. */}}
{{- define "cascade.components" -}}
{{- if eq .Values.mode "split" -}}gateway retrieval ranker{{- else -}}all{{- end -}}
{{- end -}}

{{/* Object name for a component: the gateway (or all-in-one) takes the plain name. */}}
{{- define "cascade.name" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
{{- if or (eq $c "all") (eq $c "gateway") -}}
{{- include "cascade.fullname" $root -}}
{{- else -}}
{{- printf "%s-%s" (include "cascade.fullname" $root) $c -}}
{{- end -}}
{{- end -}}

{{- define "cascade.selectorLabels" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
app.kubernetes.io/name: {{ $root.Chart.Name }}
app.kubernetes.io/instance: {{ $root.Release.Name }}
app.kubernetes.io/component: {{ $c }}
{{- end -}}

{{- define "cascade.labels" -}}
{{- $root := index . 0 -}}
{{ include "cascade.selectorLabels" . }}
app.kubernetes.io/version: {{ $root.Chart.AppVersion | quote }}
app.kubernetes.io/part-of: cascade
app.kubernetes.io/managed-by: {{ $root.Release.Service }}
helm.sh/chart: {{ printf "%s-%s" $root.Chart.Name $root.Chart.Version }}
{{- end -}}

{{- define "cascade.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "cascade.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* Whether a component's ranker runs on a GPU. */}}
{{- define "cascade.gpu" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
{{- if and (eq $c "ranker") $root.Values.ranker.gpu.enabled -}}true{{- end -}}
{{- end -}}

{{- define "cascade.image" -}}
{{- $root := index . 0 -}}{{- $c := index . 1 -}}
{{- $repo := ternary $root.Values.image.cudaRepository $root.Values.image.repository (eq (include "cascade.gpu" .) "true") -}}
{{- printf "%s:%s" $repo (default $root.Chart.AppVersion $root.Values.image.tag) -}}
{{- end -}}
