"""The plugin as Scipion sees it: discovery through the entry point, variables,
bibtex, protocols.conf, and a cheap ``import hetplugin``.

unittest style, so Scipion's runner finds these too:
``python -m hetplugin.scipion_env python -m pyworkflow.apps.pw_run_tests hetplugin.tests.test_plugin``.
"""
import json
import os
import subprocess
import sys
import tempfile
import unittest

import hetplugin


class TestPlugin(unittest.TestCase):

    def test_discovered_through_entry_point(self):
        from pwem import Domain
        plugins = Domain.getPlugins()
        self.assertIn('hetplugin', plugins, sorted(plugins))
        module = plugins['hetplugin']
        self.assertIs(module, hetplugin)
        self.assertIsInstance(module._pluginInstance, hetplugin.Plugin)

    def test_plugin_class_and_variables(self):
        import pwem
        from hetplugin.constants import HETPLUGIN_DEVICE
        self.assertTrue(issubclass(hetplugin.Plugin, pwem.Plugin))
        hetplugin.Plugin._defineVariables()
        self.assertEqual(hetplugin.Plugin.getVar(HETPLUGIN_DEVICE),
                         os.environ.get(HETPLUGIN_DEVICE, 'auto'))
        env = hetplugin.Plugin.getEnviron()
        self.assertEqual(env[HETPLUGIN_DEVICE], hetplugin.Plugin.getDevice())
        self.assertEqual(hetplugin.Plugin.validateInstallation(), [])
        self.assertEqual(hetplugin.Plugin.getCoreArgs('multiclass', 'job.json'),
                         '-m hetplugin.core multiclass job.json')
        self.assertTrue(os.path.exists(hetplugin.Plugin.getPython()))
        self.assertTrue(hetplugin.__version__)
        hetplugin.Plugin.defineBinaries(None)  # nothing to install, must not fail

    def test_bibtex_has_every_reference(self):
        from pwem import Domain
        Domain.getPlugins()
        bib = hetplugin._bibtex
        for key in hetplugin._references:
            self.assertIn(key, bib)
            self.assertTrue(bib[key].get('title'))

    def test_package_data_present(self):
        pkg = os.path.dirname(hetplugin.__file__)
        self.assertGreater(os.path.getsize(os.path.join(pkg, hetplugin._logo)), 100)
        with open(os.path.join(pkg, 'protocols.conf')) as f:
            conf = f.read()
        for name in ('ProtMulticlassRefine', 'ProtFocusedRefine', 'ProtSignalSubtract'):
            self.assertIn(name, conf)

    def test_import_is_cheap(self):
        """``import hetplugin`` (what ``python -m hetplugin.core`` does first) pulls
        neither torch nor Scipion; ``hetplugin.Plugin`` brings pwem in on demand."""
        code = ("import sys, hetplugin, hetplugin.scipion_env, hetplugin.constants\n"
                "bad = [m for m in ('torch', 'pyworkflow', 'pwem') if m in sys.modules]\n"
                "assert not bad, bad\n"
                "hetplugin.Plugin\n"
                "assert 'pwem' in sys.modules and 'torch' not in sys.modules\n")
        subprocess.run([sys.executable, '-c', code], check=True)

    def test_scipion_env_configure(self):
        with tempfile.TemporaryDirectory() as tmp:
            code = ("import json, hetplugin.scipion_env as e\n"
                    "print(json.dumps(e.configure(%r)))\n" % os.path.join(tmp, 'base'))
            env = {k: v for k, v in os.environ.items() if not k.startswith('SCIPION_')}
            out = subprocess.run([sys.executable, '-c', code], check=True, env=env,
                                 capture_output=True, text=True).stdout
            values = json.loads(out)
            self.assertEqual(values['SCIPION_DOMAIN'], 'pwem')
            self.assertTrue(values['SCIPION_HOME'].startswith(tmp))
            self.assertTrue(values['SCIPION_USER_DATA'].startswith(tmp))
            with open(os.path.join(values['SCIPION_HOME'], 'config', 'hosts.conf')) as f:
                text = f.read()
            self.assertIn('[localhost]', text)
            self.assertIn('PARALLEL_COMMAND', text)

    def test_environment_is_private(self):
        """Scipion does not write into the home folder (conftest / scipion_env set it up)."""
        import pyworkflow
        default = os.path.join(os.path.expanduser('~'), 'ScipionUserData')
        self.assertNotEqual(os.path.abspath(pyworkflow.Config.SCIPION_USER_DATA), default)
        self.assertEqual(pyworkflow.Config.SCIPION_USER_DATA, os.environ['SCIPION_USER_DATA'])


if __name__ == '__main__':
    unittest.main()
