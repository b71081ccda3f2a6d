#!/usr/bin/env bash
# Write requirements.lock from a venv that passed the suite (default .venv; or pass its python).
# torch stays out: bootstrap.sh installs torch==2.13.0 first, from its own pin.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${1:-$root/.venv/bin/python}"
{
  echo "# The exact, tested set installed by scripts/bootstrap.sh (after torch==2.13.0, which is installed first)."
  echo "# Regenerate with scripts/lock.sh from a venv that passed the suite; never edit a pin without testing it."
  "$python" -m pip --disable-pip-version-check freeze --exclude-editable | grep -v '^torch=='
} > "$root/requirements.lock"
echo "wrote $root/requirements.lock"
