#!/usr/bin/env python3
"""Checks the Helm chart with Helm's own Go library (PyPI helm-sdkpy; no helm binary).

  helm-check.py lint CHART [VALUES]
      Lints the chart (renders every template, validates values.schema.json) with its
      default values, or with VALUES merged over them; exit 1 on any error.
  helm-check.py install CHART KUBECONFIG NAMESPACE [VALUES]
      `helm install` into the cluster of KUBECONFIG (the tests use their real
      control plane) without waiting; exit 1 when it fails. The release record is a Secret,
      as Helm's default (HELM_DRIVER=secret).
  helm-check.py upgrade CHART KUBECONFIG NAMESPACE [VALUES]
      `helm upgrade` of that release.
"""
import asyncio
import os
import shutil
import sys
import tempfile

import helm_sdkpy
import yaml

SEVERITY = {1: "INFO", 2: "WARNING", 3: "ERROR"}


def merged(base, over):
    out = dict(base)
    for k, v in over.items():
        out[k] = merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def with_values(chart, values_file, workdir):
    """A copy of the chart whose values.yaml has VALUES merged in (lint takes no values)."""
    copy = f"{workdir}/{chart.rstrip('/').split('/')[-1]}"
    shutil.copytree(chart, copy)
    with open(f"{chart}/values.yaml") as f:
        base = yaml.safe_load(f) or {}
    with open(values_file) as f:
        over = yaml.safe_load(f) or {}
    with open(f"{copy}/values.yaml", "w") as f:
        yaml.safe_dump(merged(base, over), f)
    return copy


def lint(chart, values_file=None):
    with tempfile.TemporaryDirectory() as tmp:
        target = with_values(chart, values_file, tmp) if values_file else chart
        result = asyncio.run(helm_sdkpy.Lint(helm_sdkpy.Configuration()).run(target))
    errors = 0
    for m in result.get("Messages") or []:
        level = SEVERITY.get(m.get("Severity"), str(m.get("Severity")))
        print(f"{level}: {m.get('Path')}: {m.get('Err') or ''}")
        errors += m.get("Severity", 0) >= 3
    what = values_file or "default values"
    print(f"lint with {what}: {errors} error(s), {result.get('TotalChartsLinted')} chart(s)")
    return 1 if errors or result.get("Errors") else 0


def install(chart, kubeconfig, namespace, values_file=None):
    os.environ.setdefault("HELM_DRIVER", "secret")
    values = {}
    if values_file:
        with open(values_file) as f:
            values = yaml.safe_load(f) or {}
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    release = asyncio.run(
        helm_sdkpy.Install(config).run("tally", chart, values=values, wait=False, timeout=60)
    )
    print(f"installed: {release.get('name', release) if isinstance(release, dict) else release}")
    return 0


def upgrade(chart, kubeconfig, namespace, values_file=None):
    os.environ.setdefault("HELM_DRIVER", "secret")
    values = {}
    if values_file:
        with open(values_file) as f:
            values = yaml.safe_load(f) or {}
    config = helm_sdkpy.Configuration(namespace=namespace, kubeconfig=kubeconfig)
    release = asyncio.run(
        helm_sdkpy.Upgrade(config).run("tally", chart, values=values, wait=False, timeout=60)
    )
    print(f"upgraded: {release.get('version', release) if isinstance(release, dict) else release}")
    return 0


if __name__ == "__main__":
    cmd, args = sys.argv[1], sys.argv[2:]
    sys.exit({"lint": lint, "install": install, "upgrade": upgrade}[cmd](*args))
