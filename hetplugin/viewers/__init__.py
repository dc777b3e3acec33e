"""hetplugin viewers: read the protocols' outputs and draw plots; never compute science.

``MulticlassViewer`` (ProtMulticlassRefine): convergence plots from the run's
``history.json`` and per-class FSC curves from ``model.json``, plus the output
classes and class maps with pwem's default viewers.
``render_multiclass_plots`` writes the same plots to a PNG without a display.
"""
from .viewer_multiclass import (MulticlassViewer, render_multiclass_plots,
                                render_protocol_plots)

__all__ = ['MulticlassViewer', 'render_multiclass_plots', 'render_protocol_plots']
