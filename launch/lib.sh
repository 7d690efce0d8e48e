# shellcheck shell=bash
# Shared by the launchers (sourced after they cd to the repository root).

# Print a command on one line, quoted exactly like Python's shlex.join, so it can be pasted back.
show_command() {
  local arg quoted=()
  for arg in "$@"; do
    if [[ -n "$arg" && "$arg" =~ ^[A-Za-z0-9_@%+=:,./-]+$ ]]; then
      quoted+=("$arg")
    else
      quoted+=("'${arg//\'/\'\"\'\"\'}'")
    fi
  done
  echo "${quoted[*]}"
}

# Activate the project's virtual environment: $VENV (default .venv) when it exists; VENV= skips it.
activate_venv() {
  local venv=${VENV-.venv}
  if [[ -n "$venv" && -f "$venv/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$venv/bin/activate"
  fi
}
