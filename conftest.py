"""Repository-wide pytest set-up: a private, headless Scipion environment.

pyworkflow reads its configuration when first imported, so this file sets the
environment at import time, before any test module (or pytest plugin) imports
pyworkflow / pwem. Everything Scipion writes (SCIPION_HOME/config/hosts.conf,
projects, test outputs) goes into one temporary folder per pytest run, removed
at the end unless HETPLUGIN_KEEP_TEST_DATA=1 (then its path is printed).
Set HETPLUGIN_SCIPION_BASE=/some/dir to choose the folder (kept afterwards).
"""
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from hetplugin.scipion_env import configure  # noqa: E402  (must not import pyworkflow)

_CHOSEN_BASE = os.environ.get("HETPLUGIN_SCIPION_BASE") or None
_ENV = configure(_CHOSEN_BASE)


def pytest_report_header(config):
    return "hetplugin: Scipion folders under %s" % _ENV["HETPLUGIN_SCIPION_BASE"]


def pytest_unconfigure(config):
    base = _ENV["HETPLUGIN_SCIPION_BASE"]
    if _CHOSEN_BASE or os.environ.get("HETPLUGIN_KEEP_TEST_DATA") == "1":
        print("\nhetplugin: Scipion test data kept in %s" % base)
        return
    shutil.rmtree(base, ignore_errors=True)
