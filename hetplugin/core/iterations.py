"""How many iterations a multiclass run needs, and what its history says of how it ended:
plain Python, so that the protocols read the rules without importing torch.

From one reference the classes separate during an annealed first half of the run, then
settle, are aligned again one by one and classified once more; more classes take longer
at every stage. Measured with three classes from one reference:

* the tests' phantom (box 40, seeds 6-8): 0.73-0.94 accuracy in 20 iterations, 0.90 (seed 7)
  in 25, 0.92-0.94 in 30;
* adenylate kinase open / half-closed / closed (3000 particles, box 64, SNR 0.1; the benchmark's
  seeds 11 and 5): 0.991 and 0.995 in 25 iterations, 0.995 and 0.995 in 30, at 35-45% more time.
"""

TWO_CLASS_ITERATIONS = 25
ITERATIONS_PER_EXTRA_CLASS = 5


def default_iterations(n_classes: int) -> int:
    """The default maximum number of iterations: 25 for two classes, 5 more per further class."""
    return TWO_CLASS_ITERATIONS + ITERATIONS_PER_EXTRA_CLASS * max(0, n_classes - 2)


def suggested_iterations(iterations: int, n_classes: int) -> int:
    """Iterations to suggest for a new run when one of ``iterations`` ended with its classes
    unsettled: 5 more per class beyond the first. A 20-iteration run of the phantom (seed 7)
    still changing 19% of its particles reached only 0.80 when continued to 30, against 0.927
    for a new 30-iteration run."""
    return iterations + ITERATIONS_PER_EXTRA_CLASS * max(1, n_classes - 1)


def realignment_moving(history: list, angular_step_deg: float) -> float | None:
    """The mean pose change (degrees) of the last class re-alignment iteration in ``history`` when
    it is over the angular step (the poses were still moving), else None. After a run, a value
    means the re-alignment was cut short by the iteration limit."""
    done = [h for h in history if h["stage"] == "class alignment"]
    if done and done[-1]["mean_angle_change_deg"] > angular_step_deg:
        return float(done[-1]["mean_angle_change_deg"])
    return None


def classes_unsettled(history: list, converged: bool, fraction: float = 0.02) -> float | None:
    """The fraction of particles that changed class in the last iteration when a run that did not
    converge ended in classification with over ``fraction`` of them still changing class, else
    None. A run's first classification iteration (each particle's first class) does not count."""
    classifying = [h for h in history if h["stage"] == "classification"]
    if converged or len(classifying) < 2 or history[-1]["stage"] != "classification":
        return None
    changed = float(history[-1]["changed_class_fraction"])
    return changed if changed > fraction else None


def refined_step(history: list, step_deg: float, finest_deg: float | None, tolerance_A: float) -> float:
    """The angular step of the next local search in a refinement that refines its sampling.

    As RELION's auto-refine does, the step is halved once poses have settled at the current one:
    the last iteration moved them by less than a step on average and the resolution improved by
    at most ``tolerance_A`` (it needs finer poses to improve further); never below
    ``finest_deg``. Without ``finest_deg`` (or no finer than ``step_deg``) the step stays."""
    if not finest_deg or finest_deg >= step_deg or len(history) < 2:
        return step_deg
    last, prev = history[-1], history[-2]
    current = last.get("angular_step_deg", step_deg)
    settled = (last["mean_angle_change_deg"] < current
               and min(last["resolution_A"]) >= min(prev["resolution_A"]) - tolerance_A)
    return current / 2 if settled and current / 2 >= finest_deg * (1 - 1e-6) else current
