"""scipion-em-hetplugin: heterogeneous reconstruction for Scipion 3."""
import os
import re

from setuptools import find_packages, setup

HERE = os.path.abspath(os.path.dirname(__file__))


def _version():
    with open(os.path.join(HERE, 'hetplugin', '__init__.py')) as f:
        return re.search(r"^__version__ = ['\"]([^'\"]+)['\"]", f.read(), re.M).group(1)


def _long_description():
    path = os.path.join(HERE, 'README.rst')
    if os.path.exists(path):
        with open(path, encoding='utf-8') as f:
            return f.read()
    return __doc__


setup(
    name='scipion-em-hetplugin',
    version=_version(),
    description='Scipion plugin for heterogeneous cryo-EM reconstruction: multiclass '
                'refinement, focused refinement and signal subtraction',
    long_description=_long_description(),
    long_description_content_type='text/x-rst',
    url='https://github.com/scipion-em/scipion-em-hetplugin',
    license='GPL-3.0-or-later',
    packages=find_packages(exclude=['demo_out', 'demo_out.*']),
    include_package_data=False,
    package_data={'hetplugin': ['protocols.conf', 'logo.png', '*.json', '**/*.json']},
    python_requires='>=3.9',
    install_requires=[
        'scipion-pyworkflow>=3.11',
        'scipion-em>=3.11',
        'numpy',
        'mrcfile',
        'torch>=2.0',
    ],
    extras_require={'test': ['pytest']},
    entry_points={'pyworkflow.plugin': ['hetplugin = hetplugin']},
    classifiers=[
        'Programming Language :: Python :: 3',
        'Topic :: Scientific/Engineering :: Bio-Informatics',
    ],
    keywords='scipion cryoem imageprocessing heterogeneity scipion-3.0',
)
