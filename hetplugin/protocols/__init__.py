"""hetplugin protocols (in development): ProtMulticlassRefine, ProtFocusedRefine,
ProtSignalSubtract. Each is thin: declare params, convert inputs with
``hetplugin.convert``, run ``python -m hetplugin.core`` with ``runJob``, register outputs.
"""
