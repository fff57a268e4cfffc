#!/usr/bin/env bash
# Sets up the tools that check deploy/ and helm/ (tests/deploy.rs calls this):
#   - a virtual environment at target/deploy-venv (python3 -m venv; PYTHON picks another
#     interpreter),
#   - from PyPI, when missing or at another version: helm-python-sdk (the Helm v4 engine
#     as a shared library, libhelm_c, with a Python API: no helm binary, no Go),
#     kubernetes-validate (Kubernetes' OpenAPI schemas) and skypilot (no extras: enough
#     to load and check task YAMLs offline),
#   - target/deploy-venv/bin/helm: a small `helm template` / `helm lint` work-alike over
#     helm-python-sdk, for the tests and for operators without a helm binary.
# Idempotent, and quick once done. Progress goes to stderr; the last line on stdout is
# the venv's bin directory, e.g. `BIN=$(scripts/deploy-tools.sh)`.
set -euo pipefail
REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="$REPO/target/deploy-venv"
PY="$VENV/bin/python"
PINS=(helm-python-sdk==0.2.2 kubernetes-validate==1.37.0 skypilot==0.14.1)

# shellcheck source=lib/venv.sh
source "$REPO/scripts/lib/venv.sh"
ensure_venv "$VENV" "$REPO/target/deploy-venv.lock" "${PINS[@]}"

# The helm work-alike. Rewritten when this script changes.
HELM="$VENV/bin/helm"
if [ ! -x "$HELM" ] || [ "$0" -nt "$HELM" ]; then
    cat >"$HELM.tmp" <<PYEOF
#!$PY
"""helm template / helm lint over helm-python-sdk (written by scripts/deploy-tools.sh).

  helm template [NAME] CHART [-f VALUES]... [--namespace NS]
  helm lint CHART [-f VALUES]... [--strict]
"""
import argparse
import sys

import helm_python as helm
import yaml


def values(files):
    merged = {}

    def merge(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    for f in files or []:
        with open(f) as fh:
            merge(merged, yaml.safe_load(fh) or {})
    return merged


def main():
    p = argparse.ArgumentParser(prog="helm")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("template")
    t.add_argument("args", nargs="+", help="[NAME] CHART")
    t.add_argument("-f", "--values", action="append")
    t.add_argument("-n", "--namespace", default="default")
    l = sub.add_parser("lint")
    l.add_argument("chart")
    l.add_argument("-f", "--values", action="append")
    l.add_argument("--strict", action="store_true")
    a = p.parse_args()
    try:
        if a.cmd == "template":
            name, chart = (a.args if len(a.args) == 2 else ["release-name", a.args[0]])
            out = helm.Chart.load(chart).render(values(a.values), name=name, namespace=a.namespace, is_install=True)
            for path in sorted(out):
                body = out[path].strip()
                if path.endswith("NOTES.txt") or not body:
                    continue
                print("---\n# Source: %s\n%s" % (path, body))
        else:
            report = helm.lint(a.chart, values(a.values), strict=a.strict)
            bad = False
            for m in report.get("messages", []):
                sev = {1: "INFO", 2: "WARNING", 3: "ERROR"}.get(m["severity"], "UNKNOWN")
                print("[%s] %s: %s" % (sev, m["path"], m["error"]))
                bad |= m["severity"] >= (2 if a.strict else 3)
            for e in report.get("errors", []):
                print("[ERROR] %s" % e)
                bad = True
            print("1 chart(s) linted, %s" % ("failed" if bad else "0 chart(s) failed"))
            return 1 if bad else 0
    except helm.HelmError as e:
        print("Error: %s" % e, file=sys.stderr)
        return 1
    return 0


sys.exit(main())
PYEOF
    chmod +x "$HELM.tmp"
    mv "$HELM.tmp" "$HELM"
fi

# Check that each tool works, so a broken install fails here with a clear message.
"$PY" -c 'import helm_python, kubernetes_validate, sky' >&2 || {
    echo "error: the deploy tools in $VENV do not import (remove it and rerun)" >&2
    exit 1
}
echo "$VENV/bin"
