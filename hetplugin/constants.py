"""Constants shared by the Scipion side of hetplugin (plugin, convert, protocols).

Plain Python: importing this module imports neither pyworkflow nor torch.
"""

# ---------------------------------------------------------------- variables
#: Scipion config / environment variable: where the core runs (cpu, cuda, cuda:N or auto).
HETPLUGIN_DEVICE = 'HETPLUGIN_DEVICE'
HETPLUGIN_DEVICE_DEFAULT = 'auto'
#: Scipion config / environment variable: the Python interpreter that runs the core
#: (``python -m hetplugin.core``). Default: the interpreter running Scipion.
HETPLUGIN_PYTHON = 'HETPLUGIN_PYTHON'

#: Module launched as a separate process by the protocols.
CORE_MODULE = 'hetplugin.core'

# ---------------------------------------------------------------- STAR labels
#: STAR column (RELION's own label, as scipion-em-relion uses it) that carries the
#: Scipion object id of every particle, so outputs can be matched back to inputs.
OBJID_LABEL = 'rlnImageId'

#: Prefix of the Scipion attributes that hold per-particle values coming from the
#: core (e.g. ``_hetplugin_maxProb``).
EXTRA_ATTR_PREFIX = '_hetplugin_'
