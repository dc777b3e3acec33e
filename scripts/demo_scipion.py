#!/usr/bin/env python
"""The demo run by ``make demo``: a heterogeneous data set through Scipion, headless.

1. A Scipion environment and project under ``OUT/scipion`` (``hetplugin.scipion_env``).
2. A simulated data set (``hetplugin.core.simulate``): two structures that
   differ by a domain motion, per-particle CTF, moderate SNR, random poses;
   the particles are imported WITHOUT alignment (so the run is a real global
   search), with their CTFs, through a Scipion sqlite and ``ProtImportParticles``;
   the consensus map (the mix of both structures) with ``ProtImportVolumes``.
3. ``ProtMulticlassRefine`` with K=2 from the consensus map.
4. Per class: size, resolution (half-set FSC 0.143), accuracy against the truth,
   and the FSC at 0.5 of the class map against its true map; a PNG of the
   convergence plots; where everything is. Also ``OUT/demo_summary.json``.

Usage: ``python scripts/demo_scipion.py [--out demo_out] [--particles 1500] ...``
(``--help`` lists the options). It takes minutes on a CPU.
"""
import argparse
import json
import os
import re
import sys
import threading
import time

PROGRESS = re.compile(r'^(multiclass|iteration|class \d|WARNING|ERROR)')


def echo_progress(log_path, position):
    """Print the core's progress lines written to ``log_path`` after byte ``position``;
    return the position after the last complete line."""
    try:
        with open(log_path, 'rb') as f:
            f.seek(position)
            data = f.read()
    except OSError:
        return position
    end = data.rfind(b'\n') + 1
    for line in data[:end].decode(errors='replace').splitlines():
        if PROGRESS.match(line):
            print('    ' + line, flush=True)
    return position + end


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split('\n')[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument('--out', default='demo_out', help='output folder (Scipion project, data, plots)')
    p.add_argument('--project', default='hetplugin_demo', help='Scipion project name (replaced if present)')
    p.add_argument('--particles', type=int, default=1200, help='number of simulated particles')
    p.add_argument('--box', type=int, default=48, help='box size (pixels, even)')
    p.add_argument('--pixel-size', type=float, default=3.5, help='pixel size (A)')
    p.add_argument('--snr', type=float, default=0.3, help='signal-to-noise ratio of the images')
    p.add_argument('--classes', type=int, default=2, help='number of simulated structures = K')
    p.add_argument('--iterations', type=int, default=0,
                   help='largest number of EM iterations (default 0, the protocol\'s: 25 for two classes, 5 more '
                        'per further class)')
    p.add_argument('--angular-step', type=float, default=7.5, help='angular sampling (deg)')
    p.add_argument('--threads', type=int, default=max(1, min(8, os.cpu_count() or 1)),
                   help='CPU threads for the core')
    p.add_argument('--gpu', default=None, help='GPU id to compute on (default: CPU)')
    p.add_argument('--seed', type=int, default=11, help='random seed of the simulation and the run')
    p.add_argument('--report-only', action='store_true',
                   help='only print the results of the last finished run in the existing project')
    return p.parse_args(argv)


def launch(project, prot, label, follow=False):
    """Launch and wait (in a separate process, as the GUI does); with ``follow``,
    echo the core's progress lines from the run log meanwhile."""
    prot.setObjLabel(label)
    t0 = time.time()
    worker = threading.Thread(target=project.launchProtocol, args=(prot,), kwargs={'wait': True})
    worker.start()
    position = 0
    while worker.is_alive():
        worker.join(2.0)
        if follow and prot.getWorkingDir():
            position = echo_progress(prot.getStdoutLog(), position)
    if follow:
        echo_progress(prot.getStdoutLog(), position)
    prot = project.getProtocol(prot.getObjId())
    if not prot.isFinished():
        sys.exit('demo: %s failed (%s); log: %s' % (label, prot.getErrorMessage(),
                                                     os.path.abspath(prot.getStdoutLog())))
    print('demo: %-45s %6.1f s' % (label, time.time() - t0), flush=True)
    return prot


def run_demo(args, project, simDir):
    """Simulate, import and run ProtMulticlassRefine; returns the finished protocol."""
    from pwem.objects import SetOfParticles
    from pwem.protocols import ProtImportParticles, ProtImportVolumes

    from hetplugin.convert import star_to_particle_set
    from hetplugin.core.simulate import simulate
    from hetplugin.protocols import ProtMulticlassRefine

    # --- 1. simulate (poses and classes stay in the truth files only)
    simulate(simDir, n_particles=args.particles, n_classes=args.classes, box=args.box,
             pixel_size_A=args.pixel_size, snr=args.snr, seed=args.seed,
             heterogeneity='motion', with_alignment=False)
    sqlite = os.path.join(simDir, 'particles.sqlite')
    if os.path.exists(sqlite):
        os.remove(sqlite)
    parts = SetOfParticles(filename=sqlite)
    star_to_particle_set(os.path.join(simDir, 'particles.star'), parts)
    parts.write()
    parts.close()

    # --- 2. import particles (CTF, no alignment) and the consensus map
    acq = dict(voltage=300.0, sphericalAberration=2.7, amplitudeContrast=0.1, magnification=50000)
    importParts = launch(project, project.newProtocol(
        ProtImportParticles, importFrom=ProtImportParticles.IMPORT_FROM_SCIPION,
        sqliteFile=sqlite, samplingRate=args.pixel_size, **acq), 'import simulated particles')
    importVol = launch(project, project.newProtocol(
        ProtImportVolumes, samplingRate=args.pixel_size,
        filesPath=os.path.join(simDir, 'consensus.mrc')), 'import consensus map')

    # --- 3. multiclass refinement, global search
    refine = project.newProtocol(ProtMulticlassRefine, numberOfClasses=args.classes,
                                 numberOfIterations=args.iterations,
                                 angularSamplingDeg=args.angular_step, doLocalSearch=False,
                                 randomSeed=args.seed, numberOfThreads=args.threads,
                                 useGpu=args.gpu is not None, gpuList=args.gpu or '0')
    refine.inputParticles.set(importParts)
    refine.inputParticles.setExtended('outputParticles')
    refine.referenceVolume.set(importVol)
    refine.referenceVolume.setExtended('outputVolume')
    errors = refine.validate()
    if errors:
        sys.exit('demo: the protocol form is not valid:\n  ' + '\n  '.join(errors))
    for warning in refine._warnings():
        print('demo: warning: %s' % warning)
    print("demo: multiclass refinement, global search (minutes on a CPU); the core's progress:",
          flush=True)
    return launch(project, refine, 'multiclass refinement K=%d' % args.classes, follow=True)


def report(refine, project, simDir, out):
    """Per class: size, resolution, accuracy and FSC against the truth; poses; files."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    from hetplugin.core.fsc import fsc, resolution_at
    from hetplugin.core.mrc import read_volume
    from hetplugin.core.rotations import angular_distance_deg, euler_to_matrix
    from hetplugin.core.starfile import read_particles
    from hetplugin.viewers import render_protocol_plots

    with open(os.path.join(simDir, 'truth.json')) as f:
        truthInfo = json.load(f)
    truthTable = read_particles(os.path.join(simDir, 'truth_particles.star'))
    truth = np.asarray(truthTable.class_number)
    model = refine._readJson('model')
    box, pixel = truthInfo['box'], truthInfo['pixel_size_A']
    predicted = np.zeros(len(truth), dtype=int)
    for p in refine.outputParticles.iterItems():
        predicted[p.getObjId() - 1] = p.getClassId()      # ids 1..N follow the STAR rows
    k = len(model['classes'])
    overlap = np.zeros((k, truthInfo['n_classes']), dtype=int)   # [output class, true class]
    for o, t in zip(predicted, truth):
        if o > 0:
            overlap[o - 1, t - 1] += 1
    rows, cols = linear_sum_assignment(-overlap)
    matched = {int(r) + 1: int(c) + 1 for r, c in zip(rows, cols)}
    accuracy = overlap[rows, cols].sum() / len(truth)

    info = {c['class_number']: c for c in model['classes']}
    print('\nhetplugin demo: %d particles, box %d, %.2f A/px, SNR %g, %d structures (%s)'
          % (len(truth), box, pixel, truthInfo['snr'], truthInfo['n_classes'],
             'domain motion' if truthInfo.get('heterogeneity') == 'motion' else 'domain removal'))
    print('multiclass refinement: %d iterations (%s)\n'
          % (model['iterations'], 'converged' if refine._converged(model) else 'iteration limit'))
    print('class  particles   share  resolution  true class  purity  recall  FSC(0.5) vs truth')
    classes = []
    for cls3D in refine.outputClasses.iterItems(orderBy='id'):   # one reused object: read it here
        cid = cls3D.getObjId()
        t = matched.get(cid)
        size = cls3D.getSize()
        mapPath = cls3D.getRepresentative().getFileName()
        purity = overlap[cid - 1, t - 1] / max(size, 1) if t else 0.0
        recall = overlap[cid - 1, t - 1] / max((truth == t).sum(), 1) if t else 0.0
        res05 = float('nan')
        if t:
            classMap, _ = read_volume(mapPath)
            trueMap, _ = read_volume(os.path.join(simDir, truthInfo['truth_maps'][t - 1]))
            res05 = resolution_at(fsc(classMap, trueMap), 0.5, box, pixel)
        res = info[cid]['resolution_A']
        print('%5d  %9d  %5.1f%%  %8.1f A  %10s  %6.3f  %6.3f  %8.1f A'
              % (cid, size, 100.0 * size / len(truth), res, t or '-', purity, recall, res05))
        classes.append(dict(class_number=cid, size=size, resolution_A=res, true_class=t,
                            purity=float(purity), recall=float(recall), fsc05_vs_truth_A=res05,
                            map=os.path.join(project.getPath(), mapPath)))
    print('\noverall accuracy (best matching of classes): %.3f' % accuracy)

    # poses: the run's STAR against the truth (the reference is the true consensus: same frame)
    found = read_particles(refine.getOutputFile('out_particles'))
    rowsOf = np.asarray(found.columns['rlnImageId'], dtype=int) - 1
    trueRot = euler_to_matrix(*(np.asarray(a)[rowsOf] for a in (
        truthTable.rot_deg, truthTable.tilt_deg, truthTable.psi_deg)))
    poseError = angular_distance_deg(euler_to_matrix(found.rot_deg, found.tilt_deg, found.psi_deg),
                                     trueRot)
    print('pose error against the truth: median %.1f deg, %.0f%% of particles within 10 deg'
          % (np.median(poseError), 100.0 * np.mean(poseError < 10)))

    png = render_protocol_plots(refine, os.path.join(out, 'multiclass_plots.png'))
    runDir = os.path.join(project.getPath(), refine.getWorkingDir())
    summary = dict(particles=len(truth), box=box, pixel_size_A=pixel, snr=truthInfo['snr'],
                   iterations=model['iterations'], converged=refine._converged(model),
                   accuracy=float(accuracy), median_pose_error_deg=float(np.median(poseError)),
                   classes=classes, run_folder=runDir, project=project.getPath(), plots=png)
    with open(os.path.join(out, 'demo_summary.json'), 'w') as f:
        json.dump(summary, f, indent=1)

    print('\nwhere things are:')
    print('  Scipion project   %s' % project.getPath())
    print('  multiclass run    %s' % runDir)
    print('                    (logs/run.stdout; extra/: class maps, particles.star, model.json, '
          'history.json)')
    for c in classes:
        print('  class %d map       %s' % (c['class_number'], c['map']))
    print('  plots             %s' % png)
    print('  simulated data    %s  (truth_particles.star, truth_class_NNN.mrc)' % simDir)
    print('  summary           %s' % os.path.join(out, 'demo_summary.json'))
    return summary


def main(argv=None):
    args = parse_args(argv)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)

    # Scipion's environment must be set before pyworkflow is imported.
    from hetplugin.scipion_env import configure
    env = configure(os.path.join(out, 'scipion'))
    from pyworkflow.project import Manager
    from hetplugin.protocols import ProtMulticlassRefine

    start = time.time()
    manager = Manager()
    simDir = os.path.join(out, 'sim')
    if args.report_only:
        project = manager.loadProject(args.project)
        os.chdir(project.getPath())
        runs = [r for r in project.getRuns() if isinstance(r, ProtMulticlassRefine) and r.isFinished()]
        if not runs:
            sys.exit('demo: no finished multiclass run in project %s' % args.project)
        refine = runs[-1]
    else:
        if manager.hasProject(args.project):
            manager.deleteProject(args.project)
        project = manager.createProject(args.project)
        os.chdir(project.getPath())          # protocols run relative to the project folder
        refine = run_demo(args, project, simDir)

    report(refine, project, simDir, out)
    print('  open the project: SCIPION_HOME=%s SCIPION_USER_DATA=%s SCIPION_DOMAIN=pwem '
          '%s -m pyworkflow.apps.pw_project %s'
          % (env['SCIPION_HOME'], env['SCIPION_USER_DATA'], sys.executable, args.project))
    print('demo: done in %.0f s' % (time.time() - start))
    return 0


if __name__ == '__main__':
    sys.exit(main())
