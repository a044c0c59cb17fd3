{{/* Names, labels and the pieces every tally workload shares. */}}

{{- define "tally.fullname" -}}
{{- if contains "tally" .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-tally" .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "tally.labels" -}}
app.kubernetes.io/part-of: tally
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "tally.selector" -}}
app.kubernetes.io/part-of: tally
app.kubernetes.io/instance: {{ .root.Release.Name }}
app.kubernetes.io/component: {{ .component }}
{{- end -}}

{{- define "tally.image" -}}
{{ .Values.image.repository }}:{{ .Values.image.tag | default .Chart.AppVersion }}
{{- end -}}

{{/* Restricted pod security: non-root, read-only root, no capabilities, RuntimeDefault seccomp. */}}
{{- define "tally.podSecurity" -}}
runAsNonRoot: true
runAsUser: 65532
runAsGroup: 65532
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{- define "tally.containerSecurity" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: ["ALL"]
seccompProfile:
  type: RuntimeDefault
{{- end -}}

{{/* Environment for Kafka and ClickHouse, credentials from Secrets. */}}
{{- define "tally.pipelineEnv" -}}
- name: TALLY_KAFKA
  value: {{ .Values.kafka.brokers | quote }}
- name: TALLY_TOPIC
  value: {{ .Values.kafka.topic | quote }}
- name: TALLY_TOPIC_PARTITIONS
  value: {{ .Values.kafka.partitions | quote }}
{{- if ne .Values.kafka.securityProtocol "plaintext" }}
- name: TALLY_KAFKA_SECURITY_PROTOCOL
  value: {{ .Values.kafka.securityProtocol | quote }}
{{- end }}
{{- if .Values.kafka.sasl.mechanism }}
- name: TALLY_KAFKA_SASL_MECHANISM
  value: {{ .Values.kafka.sasl.mechanism | quote }}
- name: TALLY_KAFKA_SASL_USERNAME
  valueFrom:
    secretKeyRef: {name: {{ required "kafka.sasl.existingSecret is needed with kafka.sasl.mechanism" .Values.kafka.sasl.existingSecret }}, key: username}
- name: TALLY_KAFKA_SASL_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.kafka.sasl.existingSecret }}, key: password}
{{- end }}
{{- if .Values.kafka.tls.caSecret }}
- name: TALLY_KAFKA_SSL_CA_LOCATION
  value: /etc/tally/kafka-ca/ca.crt
{{- end }}
- name: TALLY_CLICKHOUSE
  value: {{ .Values.clickhouse.url | quote }}
- name: TALLY_CLICKHOUSE_DATABASE
  value: {{ .Values.clickhouse.database | quote }}
{{- if .Values.clickhouse.cluster }}
- name: TALLY_CLICKHOUSE_CLUSTER
  value: {{ .Values.clickhouse.cluster | quote }}
{{- end }}
{{- if .Values.clickhouse.replicaUrls }}
- name: TALLY_CLICKHOUSE_REPLICA_URLS
  value: {{ join "," .Values.clickhouse.replicaUrls | quote }}
{{- end }}
{{- if .Values.clickhouse.existingSecret }}
- name: TALLY_CLICKHOUSE_USER
  valueFrom:
    secretKeyRef: {name: {{ .Values.clickhouse.existingSecret }}, key: username}
- name: TALLY_CLICKHOUSE_PASSWORD
  valueFrom:
    secretKeyRef: {name: {{ .Values.clickhouse.existingSecret }}, key: password}
{{- end }}
{{- end -}}

{{- define "tally.kafkaCaVolume" -}}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  secret:
    secretName: {{ .Values.kafka.tls.caSecret }}
    items: [{key: ca.crt, path: ca.crt}]
{{- end }}
{{- end -}}

{{- define "tally.kafkaCaMount" -}}
{{- if .Values.kafka.tls.caSecret }}
- name: kafka-ca
  mountPath: /etc/tally/kafka-ca
  readOnly: true
{{- end }}
{{- end -}}

{{/* The Secret of the agents' ingest token (its key `token`, and `tokens.yaml` granting it every namespace). */}}
{{- define "tally.agentTokenSecret" -}}
{{ include "tally.fullname" . }}-agent-token
{{- end -}}
