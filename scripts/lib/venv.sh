# Sourced by the scripts that need a Python virtual environment.
#
# ensure_venv VENV LOCKFILE PIN...
#   Creates VENV (python3 -m venv; PYTHON picks another interpreter) unless it exists,
#   and pip-installs every PIN (name==version) not installed at exactly that version.
#   One caller at a time holds LOCKFILE (tests may run setups concurrently); the lock
#   stays held on fd 9 until the calling script exits. Messages go to stderr.
#   Sets VENV_INSTALLED to the pins it installed (empty when nothing was needed).
ensure_venv() {
    local venv="$1" lock="$2"
    shift 2
    local py="$venv/bin/python"
    mkdir -p "$(dirname "$lock")"
    exec 9>"$lock"
    if command -v flock >/dev/null 2>&1; then
        flock 9
    fi
    if [ ! -x "$py" ]; then
        local base="${PYTHON:-python3}"
        if ! command -v "$base" >/dev/null 2>&1; then
            echo "error: $base not found; install Python 3.9 or newer (and its venv module)" >&2
            return 1
        fi
        echo "creating $venv with $("$base" --version 2>&1)" >&2
        rm -rf "$venv"
        if ! "$base" -m venv "$venv" >&2; then
            echo "error: '$base -m venv' failed (on Debian/Ubuntu: apt-get install python3-venv)" >&2
            rm -rf "$venv"
            return 1
        fi
    fi
    local missing
    missing=$("$py" - "$@" <<'PYEOF'
import sys
from importlib import metadata

for pin in sys.argv[1:]:
    name, version = pin.split("==")
    try:
        if metadata.version(name) == version:
            continue
    except metadata.PackageNotFoundError:
        pass
    print(pin)
PYEOF
)
    VENV_INSTALLED="$missing"
    if [ -n "$missing" ]; then
        # shellcheck disable=SC2086
        echo "installing:" $missing >&2
        # shellcheck disable=SC2086
        if ! "$py" -m pip install --quiet --disable-pip-version-check $missing >&2; then
            echo "error: pip could not install$(printf ' %s' $missing) from PyPI into $venv" >&2
            return 1
        fi
    fi
}
