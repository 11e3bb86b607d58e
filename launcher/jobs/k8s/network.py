"""The NetworkPolicy that closes a job's Ray pods to all but each other, the job's submitter and
the KubeRay operator (on the dashboard port)."""

from __future__ import annotations

from typing import Any

from launcher.jobs.k8s.names import labels, networkpolicy_name

DASHBOARD_PORT = 8265
# KubeRay's submitter is a Kubernetes Job named after the RayJob; the Job controller labels its
# pods with this. The operator polls the job's status through the dashboard.
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
OPERATOR_LABELS = {"app.kubernetes.io/name": "kuberay-operator"}


def render_networkpolicy(name: str, namespace: str) -> dict[str, Any]:
    """Ingress to the job's Ray pods only from each other, from its submitter (any port), and
    from the KubeRay operator (the dashboard port, where it polls the job)."""
    own = {"podSelector": {"matchLabels": labels(name)}}
    submitter = {"podSelector": {"matchLabels": {JOB_NAME_LABEL: name}}}
    operator = {"namespaceSelector": {}, "podSelector": {"matchLabels": dict(OPERATOR_LABELS)}}
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": {
            "name": networkpolicy_name(name),
            "namespace": namespace,
            "labels": labels(name),
        },
        "spec": {
            "podSelector": {"matchLabels": labels(name)},
            "policyTypes": ["Ingress"],
            "ingress": [
                {"from": [own, submitter]},
                {"from": [operator], "ports": [{"protocol": "TCP", "port": DASHBOARD_PORT}]},
            ],
        },
    }
