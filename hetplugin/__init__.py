# **************************************************************************
# *
# * hetplugin: heterogeneous reconstruction for Scipion 3
# *
# * This program is free software; you can redistribute it and/or modify
# * it under the terms of the GNU General Public License as published by
# * the Free Software Foundation; either version 3 of the License, or
# * (at your option) any later version.
# *
# **************************************************************************
"""Scipion plugin ``hetplugin``: multiclass refinement, focused refinement and
signal subtraction, computed by a framework-free engine (``hetplugin.core``,
torch + numpy) that the protocols launch as a separate process.

Importing this package is cheap: it imports neither torch nor pyworkflow/pwem.
The Scipion ``Plugin`` class is built on first access (``hetplugin.Plugin``,
PEP 562 module ``__getattr__``), which is how pyworkflow reaches it when it
registers the plugin. This keeps ``python -m hetplugin.core ...`` (launched by
the protocols, or by hand on RELION STAR files) free of Scipion, and lets
``hetplugin.scipion_env`` set Scipion's environment before pyworkflow is read.
"""
import os
import sys

from .constants import (HETPLUGIN_DEVICE, HETPLUGIN_DEVICE_DEFAULT,
                        HETPLUGIN_PYTHON, CORE_MODULE)

__version__ = '0.1.0'
_logo = 'logo.png'
_references = ['Scheres2012a', 'Scheres2012b', 'Punjani2017', 'Zhong2022']


def _define_plugin_class():
    """Build the ``Plugin`` class (imports pwem; called once, lazily)."""
    import pwem
    import pyworkflow.utils as pwutils

    class Plugin(pwem.Plugin):
        """Scipion plugin for hetplugin. No external binaries: the engine is the
        ``hetplugin.core`` Python package, run with :meth:`getPython`."""
        _homeVar = ''        # nothing to install: no home folder
        _pathVars = []       # so validateInstallation() has nothing to check
        _supportedVersions = [__version__]
        _url = 'https://github.com/scipion-em/scipion-em-hetplugin'

        @classmethod
        def _defineVariables(cls):
            cls._defineVar(HETPLUGIN_DEVICE, HETPLUGIN_DEVICE_DEFAULT,
                           description="Where the hetplugin core computes: 'cpu', "
                                       "'cuda', 'cuda:N' or 'auto' (CUDA when "
                                       "torch sees a GPU, else CPU).")
            cls._defineVar(HETPLUGIN_PYTHON, sys.executable,
                           description="Python interpreter that runs the hetplugin "
                                       "core (needs torch, numpy, mrcfile). Default: "
                                       "the one running Scipion.")

        @classmethod
        def getEnviron(cls):
            """Environment for ``python -m hetplugin.core``: the current one plus
            HETPLUGIN_DEVICE as configured in Scipion."""
            environ = pwutils.Environ(os.environ)
            environ[HETPLUGIN_DEVICE] = cls.getDevice()
            return environ

        @classmethod
        def getDevice(cls):
            """Configured device string ('auto', 'cpu', 'cuda', 'cuda:N')."""
            return str(cls.getVar(HETPLUGIN_DEVICE, HETPLUGIN_DEVICE_DEFAULT)
                       or HETPLUGIN_DEVICE_DEFAULT)

        @classmethod
        def getPython(cls):
            """Interpreter that runs the core."""
            return cls.getVar(HETPLUGIN_PYTHON) or sys.executable

        @classmethod
        def getCoreArgs(cls, command, *args):
            """Arguments (after the interpreter) to run a core command, e.g.
            ``self.runJob(Plugin.getPython(), Plugin.getCoreArgs('multiclass',
            'job.json'), env=Plugin.getEnviron())``."""
            return ' '.join(['-m', CORE_MODULE, command] + [str(a) for a in args])

        @classmethod
        def defineBinaries(cls, env):
            """Nothing to install: the core ships with the plugin."""
            pass

    Plugin.__qualname__ = 'Plugin'
    return Plugin


def __getattr__(name):
    if name == 'Plugin':
        plugin_class = _define_plugin_class()
        globals()['Plugin'] = plugin_class
        return plugin_class
    raise AttributeError("module %r has no attribute %r" % (__name__, name))
