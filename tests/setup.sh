# Sourced by the scripts that install what tests need (tests/run, tests/deploy/kubernetes.sh):
# system packages with apt-get (as root), and Python venvs with one pinned PyPI package.

apt_updated=0
# apt_install PACKAGE...: installs with apt-get, updating the package lists once per script.
apt_install() {
  if [ "$apt_updated" -eq 0 ]; then
    apt-get update -qq
    apt_updated=1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@" >/dev/null
}

# can_apt: whether this script may install system packages (root on a system with apt-get).
can_apt() {
  [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1
}

# pinned_venv DIR PACKAGE VERSION WHO: makes sure DIR/bin/python has PACKAGE==VERSION from
# PyPI (WHO names the caller in its progress line). Debian's python3 has no `venv` (ensurepip)
# without python3-venv, which is installed when can_apt allows. Returns 2 when no venv can be
# made, 3 when pip could not install the package.
pinned_venv() {
  local venv=$1 package=$2 version=$3 who=$4
  local check="import importlib.metadata as m, sys; sys.exit(m.version('$package') != '$version')"
  "$venv/bin/python" -c "$check" >/dev/null 2>&1 && return 0
  echo "$who: installing $package $version in $venv" >&2
  if [ ! -x "$venv/bin/pip" ]; then
    rm -rf "$venv"
    if ! python3 -m venv "$venv" >/dev/null 2>&1; then
      can_apt || return 2
      apt_install python3 python3-venv
      rm -rf "$venv"
      python3 -m venv "$venv" || return 2
    fi
  fi
  "$venv/bin/pip" install -q --disable-pip-version-check "$package==$version" >&2 || return 3
}
