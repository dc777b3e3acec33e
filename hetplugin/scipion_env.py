"""Headless Scipion environment for tests and batch scripts.

pyworkflow reads its configuration from environment variables the first time it
is imported, so they must be set before anything imports ``pyworkflow`` or
``pwem``. :func:`configure` does that, pointing every Scipion folder into one
base folder (a fresh temporary folder by default, never the home folder), and
writes the ``config/hosts.conf`` that protocol launches need.

This module must not import pyworkflow (it runs before it). Uses:

* ``conftest.py`` at the repository root calls :func:`configure` for pytest.
* A batch script calls it first::

      from hetplugin.scipion_env import configure
      configure('/data/scipion_batch')         # before importing pyworkflow
      from pyworkflow.project import Manager

* As a command wrapper: ``python -m hetplugin.scipion_env [--base DIR] CMD ...``
  runs CMD with the environment set, e.g.
  ``python -m hetplugin.scipion_env python -m pyworkflow.apps.pw_run_tests hetplugin.tests.test_convert``.
"""
from __future__ import annotations

import os
import sys
import tempfile
import warnings

__all__ = ["configure", "HOSTS_CONF"]

#: Contents of ``$SCIPION_HOME/config/hosts.conf``: one local host, MPI via mpirun,
#: no queue system (what pyworkflow's own ``HostConfig.writeBasic`` writes).
HOSTS_CONF = ("[localhost]\n"
              "PARALLEL_COMMAND = mpirun -np %_(JOB_NODES)d --map-by node %_(COMMAND)s\n")


def configure(base_dir: str | os.PathLike | None = None, *,
              keep_existing: bool = False) -> dict:
    """Set the Scipion environment variables for a headless run; return them.

    Parameters
    ----------
    base_dir:
        Folder that holds ``SCIPION_HOME`` (``base_dir/home``, with
        ``config/hosts.conf``) and ``SCIPION_USER_DATA`` (``base_dir/userdata``,
        where projects and test outputs go). Created if missing. ``None`` makes a
        fresh temporary folder (``hetplugin-scipion-*`` under the system temp dir).
    keep_existing:
        If True, variables already present in ``os.environ`` are left as they are
        (use with a real Scipion installation); by default they are overwritten.

    Returns
    -------
    dict
        The variables as they are now in ``os.environ`` plus ``HETPLUGIN_SCIPION_BASE``.
    """
    if "pyworkflow" in sys.modules:
        warnings.warn("hetplugin.scipion_env.configure() called after pyworkflow was "
                      "imported: pyworkflow has already read its configuration",
                      RuntimeWarning, stacklevel=2)
    if base_dir is None:
        base_dir = tempfile.mkdtemp(prefix="hetplugin-scipion-")
    base_dir = os.path.abspath(os.fspath(base_dir))
    home = os.path.join(base_dir, "home")
    user_data = os.path.join(base_dir, "userdata")

    wanted = {
        "SCIPION_DOMAIN": "pwem",
        "SCIPION_HOME": home,
        "SCIPION_USER_DATA": user_data,
        "SCIPION_PYTHON": sys.executable,
        "SCIPION_TEST_NOSYNC": "1",
        "SCIPION_NOTIFY": "False",
    }
    for key, value in wanted.items():
        if keep_existing and os.environ.get(key):
            continue
        os.environ[key] = value

    # Folders pyworkflow expects; hosts.conf is required to launch protocols.
    home = os.environ["SCIPION_HOME"]
    config_dir = os.path.join(home, "config")
    os.makedirs(config_dir, exist_ok=True)
    os.makedirs(os.environ["SCIPION_USER_DATA"], exist_ok=True)
    hosts = os.path.join(config_dir, "hosts.conf")
    if not os.path.exists(hosts):
        with open(hosts, "w") as f:
            f.write(HOSTS_CONF)

    os.environ["HETPLUGIN_SCIPION_BASE"] = base_dir
    result = {key: os.environ[key] for key in wanted}
    result["HETPLUGIN_SCIPION_BASE"] = base_dir
    return result


def _main(argv: list[str]) -> int:
    """``python -m hetplugin.scipion_env [--base DIR] CMD ...``: run CMD in the environment."""
    base = None
    if argv[:1] == ["--base"] and len(argv) >= 2:
        base, argv = argv[1], argv[2:]
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        print("usage: python -m hetplugin.scipion_env [--base DIR] CMD [ARGS...]")
        return 0 if argv else 2
    env = configure(base)
    print("hetplugin.scipion_env: Scipion folders under %s" % env["HETPLUGIN_SCIPION_BASE"],
          file=sys.stderr)
    sys.stdout.flush()
    os.execvp(argv[0], argv)
    return 1  # not reached


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
