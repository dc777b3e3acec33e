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
"""Results of ``ProtMulticlassRefine`` and ``ProtFocusedRefine``: convergence plots and maps.

Only reads what the core wrote (``history.json``: one entry per iteration;
``model.json``: per-class size, resolution and FSC); computes no science.

* :func:`render_multiclass_plots` draws every plot into one PNG file with
  matplotlib's Agg canvas (no display, no pyplot state): for reports, batch
  scripts and tests.
* :class:`MulticlassViewer` is the Scipion protocol viewer: the same plots in
  windows, plus the output classes and class maps with pwem's default viewers.
"""
import json
import math
import os

import numpy as np

import pyworkflow.protocol.params as params
import pyworkflow.viewer as pwviewer
from pwem.viewers import ChimeraViewer, DataViewer, EmPlotter, EmProtocolViewer

from hetplugin.protocols import ProtFocusedRefine, ProtMulticlassRefine

FSC_THRESHOLD = 0.143

#: name -> (title, x label, y label, drawing function); the order of the PNG's panels.
PLOTS = {}


def _plot(name, title, xlabel, ylabel):
    def register(func):
        PLOTS[name] = (title, xlabel, ylabel, func)
        return func
    return register


# --------------------------------------------------------------------------- reading
def load_json(path_or_value):
    """A JSON file's content; a dict/list is returned as it is; None when absent."""
    if path_or_value is None or isinstance(path_or_value, (dict, list)):
        return path_or_value
    try:
        with open(path_or_value) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _iterations(history):
    return [h.get('iteration', i + 1) for i, h in enumerate(history)]


def _per_class(history, key):
    """(iterations, array (n_iterations, K)) of a per-class history entry."""
    rows = [(it, h[key]) for it, h in zip(_iterations(history), history) if h.get(key) is not None]
    if not rows:
        return [], np.zeros((0, 0))
    k = max(len(r[1]) for r in rows)
    values = np.full((len(rows), k), np.nan)
    for i, (_it, row) in enumerate(rows):
        values[i, :len(row)] = [np.nan if v is None else v for v in row]
    return [r[0] for r in rows], values


def _scalar(history, key):
    rows = [(it, h[key]) for it, h in zip(_iterations(history), history) if h.get(key) is not None]
    return [r[0] for r in rows], [r[1] for r in rows]


def _mark_stages(ax, history):
    """Shade the consensus-alignment and class re-alignment iterations (``stage`` 'alignment' and
    'class alignment'), when the core reports them."""
    for stage, colour, label in (('alignment', '0.9', 'consensus alignment'),
                                 ('class alignment', '#dde8f5', 'class re-alignment')):
        its = [it for it, h in zip(_iterations(history), history) if h.get('stage') == stage]
        if its:
            ax.axvspan(min(its) - 0.5, max(its) + 0.5, color=colour, zorder=0, label=label)


def _no_data(ax, what):
    ax.text(0.5, 0.5, 'no %s' % what, ha='center', va='center', transform=ax.transAxes)


# --------------------------------------------------------------------------- drawing
@_plot('classSizes', 'Class sizes', 'iteration', 'particles')
def draw_class_sizes(ax, history, model=None):
    iters, sizes = _per_class(history or [], 'class_sizes')
    if not iters:
        return _no_data(ax, 'class sizes')
    _mark_stages(ax, history)
    for j in range(sizes.shape[1]):
        ax.plot(iters, sizes[:, j], marker='o', label='class %d' % (j + 1))
    ax.legend(fontsize='small')


@_plot('resolution', 'Resolution per class (FSC 0.143)', 'iteration', 'resolution (A)')
def draw_resolution(ax, history, model=None):
    iters, res = _per_class(history or [], 'resolution_A')
    res = np.where(np.isfinite(res), res, np.nan)
    if not iters or np.all(np.isnan(res)):
        return _no_data(ax, 'resolution')
    _mark_stages(ax, history)
    for j in range(res.shape[1]):
        ax.plot(iters, res[:, j], marker='o', label='class %d' % (j + 1))
    ax.invert_yaxis()          # better resolution upwards
    ax.legend(fontsize='small')


def _draw_scalar(ax, history, key, what, from_zero=True):
    """One value per iteration (``history[i][key]``) with the stages marked."""
    iters, values = _scalar(history or [], key)
    if not iters:
        return _no_data(ax, what)
    _mark_stages(ax, history)
    ax.plot(iters, values, marker='o')
    if from_zero:
        ax.set_ylim(bottom=0)


@_plot('classChanges', 'Particles changing class', 'iteration', 'fraction')
def draw_class_changes(ax, history, model=None):
    return _draw_scalar(ax, history, 'changed_class_fraction', 'class changes')


@_plot('angleChanges', 'Orientation change', 'iteration', 'mean change (deg)')
def draw_angle_changes(ax, history, model=None):
    return _draw_scalar(ax, history, 'mean_angle_change_deg', 'orientation changes')


@_plot('logLikelihood', 'Log-likelihood', 'iteration', 'log-likelihood')
def draw_loglik(ax, history, model=None):
    return _draw_scalar(ax, history, 'loglik', 'log-likelihood', from_zero=False)


@_plot('fsc', 'Half-set FSC per class', 'resolution (1/A)', 'FSC')
def draw_fsc(ax, history=None, model=None):
    classes = (model or {}).get('classes') or []
    pixel = (model or {}).get('pixel_size_A')
    curves = [(c.get('class_number', i + 1), c.get('fsc')) for i, c in enumerate(classes)]
    curves = [(k, np.asarray(f, dtype=float)) for k, f in curves if f]
    if not curves or not pixel:
        return _no_data(ax, 'FSC')
    for k, curve in curves:
        box = 2 * (len(curve) - 1)
        freq = np.arange(len(curve)) / (box * pixel)
        res = next((c.get('resolution_A') for c in classes if c.get('class_number') == k), None)
        label = 'class %d' % k + (' (%.1f A)' % res if res and math.isfinite(res) else '')
        ax.plot(freq[1:], curve[1:], label=label)
    ax.axhline(FSC_THRESHOLD, color='grey', linestyle='--', linewidth=0.8)
    ax.set_ylim(-0.1, 1.05)
    ax.legend(fontsize='small')


def render_multiclass_plots(history, model, png_path, title=None, dpi=100):
    """Draw every plot (class sizes, resolution, class changes, orientation
    change, log-likelihood, FSC) into one PNG; returns ``png_path``.

    ``history`` / ``model``: the core's ``history.json`` / ``model.json`` (paths
    or their content). Missing data give an empty panel, not an error.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    history = load_json(history) or []
    model = load_json(model) or {}
    if not history and model.get('history'):
        history = model['history']
    figure = Figure(figsize=(15, 8.5), dpi=dpi)
    FigureCanvasAgg(figure)
    axes = figure.subplots(2, 3).ravel()
    for ax, (name, (plot_title, xlabel, ylabel, draw)) in zip(axes, PLOTS.items()):
        ax.set_title(plot_title)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        draw(ax, history, model)
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(png_path)
    return png_path


# --------------------------------------------------------------------------- viewer
VOLUME_SLICES, VOLUME_CHIMERA = 0, 1


class MulticlassViewer(EmProtocolViewer):
    """Convergence plots (from history.json / model.json), the output classes
    and the class maps of a multiclass refinement."""
    _label = 'viewer multiclass refinement'
    _targets = [ProtMulticlassRefine]
    _environments = [pwviewer.DESKTOP_TKINTER]

    def _defineParams(self, form):
        form.addSection(label='Results')
        form.addParam('showClasses3D', params.LabelParam,
                      label='Show output classes',
                      help='The output 3D classes (representative = class map) and their '
                           'particles, with pwem\'s default viewer.')
        form.addParam('displayVol', params.EnumParam, choices=['slices', 'chimerax'],
                      default=VOLUME_SLICES, display=params.EnumParam.DISPLAY_HLIST,
                      label='Display class maps with',
                      help='*slices*: the maps as 2D slices (pwem\'s data viewer). '
                           '*chimerax*: the maps as surfaces in ChimeraX (if installed).')
        form.addParam('showVolumes', params.LabelParam,
                      label='Show class maps',
                      help='Open outputVolumes, one map per class.')
        self._defineConvergenceParams(form)

    def _defineConvergenceParams(self, form):
        group = form.addGroup('Convergence')
        for name, (title, _x, _y, _f) in PLOTS.items():
            group.addParam('plot_' + name, params.LabelParam, label='Plot: %s' % title.lower(),
                           help='%s, from the run\'s %s.' % (
                               title, 'model.json' if name == 'fsc' else 'history.json'))
        group.addParam('plotAll', params.LabelParam, label='All plots in one window',
                       help='Every convergence plot and the FSC curves together.')

    def _getVisualizeDict(self):
        return dict(self._convergenceViews(), showClasses3D=self._showClasses, showVolumes=self._showVolumes)

    def _convergenceViews(self):
        visualize = {'plotAll': self._plotAll}
        for name in PLOTS:
            visualize['plot_' + name] = self._plotOne
        return visualize

    # ---------------------------------------------------------------- data
    def _history(self):
        history = load_json(self.protocol.getOutputFile('history'))
        return history or (self._model() or {}).get('history') or []

    def _model(self):
        return load_json(self.protocol.getOutputFile('model'))

    def _output(self, name):
        output = getattr(self.protocol, name, None)
        if output is None:
            return None, [self.errorMessage('The run has no %s yet.' % name, 'No output')]
        return output, []

    # ---------------------------------------------------------------- views
    def _showClasses(self, paramName=None):
        classes, errors = self._output('outputClasses')
        if errors:
            return errors
        return DataViewer(project=self.getProject(), protocol=self.protocol)._visualize(classes)

    def _showVolumes(self, paramName=None):
        volumes, errors = self._output('outputVolumes')
        if errors:
            return errors
        viewerClass = ChimeraViewer if self.displayVol.get() == VOLUME_CHIMERA else DataViewer
        return viewerClass(project=self.getProject(), protocol=self.protocol)._visualize(volumes)

    def _plotOne(self, paramName=None):
        name = paramName[len('plot_'):]
        title, xlabel, ylabel, draw = PLOTS[name]
        plotter = EmPlotter(x=1, y=1, windowTitle=title)
        ax = plotter.createSubPlot(title, xlabel, ylabel)
        draw(ax, self._history(), self._model())
        return [plotter]

    def _plotAll(self, paramName=None):
        history, model = self._history(), self._model()
        plotter = EmPlotter(x=2, y=3, windowTitle='Multiclass refinement', figsize=(15, 8.5))
        for title, xlabel, ylabel, draw in PLOTS.values():
            draw(plotter.createSubPlot(title, xlabel, ylabel), history, model)
        return [plotter]


class FocusedViewer(MulticlassViewer):
    """The refined map and the convergence plots (resolution, orientation change, FSC, ...) of a
    focused refinement: a multiclass run of one class."""
    _label = 'viewer focused refinement'
    _targets = [ProtFocusedRefine]

    def _defineParams(self, form):
        form.addSection(label='Results')
        form.addParam('displayVol', params.EnumParam, choices=['slices', 'chimerax'],
                      default=VOLUME_SLICES, display=params.EnumParam.DISPLAY_HLIST,
                      label='Display the map with',
                      help='*slices*: the map as 2D slices (pwem\'s data viewer). '
                           '*chimerax*: the map as a surface in ChimeraX (if installed).')
        form.addParam('showVolume', params.LabelParam, label='Show the refined map',
                      help='Open outputVolume (its half maps are registered with it).')
        self._defineConvergenceParams(form)

    def _getVisualizeDict(self):
        return dict(self._convergenceViews(), showVolume=self._showVolume)

    def _showVolume(self, paramName=None):
        volume, errors = self._output('outputVolume')
        if errors:
            return errors
        viewerClass = ChimeraViewer if self.displayVol.get() == VOLUME_CHIMERA else DataViewer
        return viewerClass(project=self.getProject(), protocol=self.protocol)._visualize(volume)


def render_protocol_plots(protocol, png_path=None):
    """PNG of a finished (or running) ProtMulticlassRefine or ProtFocusedRefine run's plots; default
    ``extra/plots.png``. Returns the path."""
    png_path = png_path or os.path.join(os.path.dirname(protocol.getOutputFile('model')), 'plots.png')
    return render_multiclass_plots(protocol.getOutputFile('history'), protocol.getOutputFile('model'),
                                   png_path, title=protocol.getRunName())
