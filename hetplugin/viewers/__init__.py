"""hetplugin viewers: read the protocols' outputs and draw plots; never compute science.

``MulticlassViewer`` (ProtMulticlassRefine): convergence plots from the run's
``history.json`` and per-class FSC curves from ``model.json``, plus the output
classes and class maps with pwem's default viewers.
``FocusedViewer`` (ProtFocusedRefine): the refined map and the same plots.
``render_multiclass_plots`` writes the same plots to a PNG without a display.
"""
from .viewer_multiclass import (FocusedViewer, MulticlassViewer, render_multiclass_plots,
                                render_protocol_plots)

__all__ = ['FocusedViewer', 'MulticlassViewer', 'render_multiclass_plots', 'render_protocol_plots']
