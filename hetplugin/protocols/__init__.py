"""hetplugin protocols: ProtMulticlassRefine, ProtFocusedRefine,
ProtSignalSubtract. Each is thin: declare params, convert inputs with
``hetplugin.convert``, run ``python -m hetplugin.core`` with ``runJob``, register outputs.

``ProtHetBase`` (no ``_label``, so Scipion treats it as a hidden base class)
holds what they share; see :mod:`.protocol_base`. Scipion finds protocols by
the names exported here: export every new protocol class.
"""
from .protocol_base import ProtHetBase
from .protocol_multiclass import ProtMulticlassRefine, MulticlassOutputs
from .protocol_subtract import ProtSignalSubtract, SubtractOutputs
from .protocol_focused import ProtFocusedRefine, FocusedOutputs

__all__ = ['ProtHetBase', 'ProtMulticlassRefine', 'MulticlassOutputs',
           'ProtSignalSubtract', 'SubtractOutputs', 'ProtFocusedRefine', 'FocusedOutputs']
