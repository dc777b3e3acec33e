"""The core is framework-free: no module under hetplugin/core imports pyworkflow
or pwem (checked on the source with ``ast``), and ``import hetplugin`` does not
import torch (checked in a fresh interpreter)."""
import ast
import os
import subprocess
import sys

import pytest

CORE_DIR = os.path.join(os.path.dirname(__file__), '..', '..', 'core')
FORBIDDEN = ('pyworkflow', 'pwem')


def _core_modules():
    for root, _dirs, files in os.walk(CORE_DIR):
        for name in sorted(files):
            if name.endswith('.py'):
                yield os.path.normpath(os.path.join(root, name))


def _imported_names(path):
    with open(path, encoding='utf-8') as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            yield node.lineno, node.module
        elif (isinstance(node, ast.Call) and getattr(node.func, 'attr', getattr(node.func, 'id', ''))
              in ('import_module', '__import__') and node.args
              and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str)):
            yield node.lineno, node.args[0].value


def test_core_has_modules():
    assert list(_core_modules()), 'no module found under %s' % CORE_DIR


@pytest.mark.parametrize('path', list(_core_modules()) or ['<none>'],
                         ids=lambda p: os.path.relpath(p, CORE_DIR))
def test_core_module_does_not_import_scipion(path):
    if path == '<none>':
        pytest.skip('no core modules yet')
    bad = ['line %d: %s' % (line, name) for line, name in _imported_names(path)
           if name.split('.')[0] in FORBIDDEN]
    assert not bad, '%s imports Scipion: %s' % (path, bad)


def test_import_hetplugin_does_not_import_torch():
    code = ("import sys, hetplugin\n"
            "assert 'torch' not in sys.modules, 'import hetplugin pulled torch'\n")
    subprocess.run([sys.executable, '-c', code], check=True)
