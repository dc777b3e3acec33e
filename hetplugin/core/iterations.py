"""How many iterations a multiclass run needs: plain Python, so that the protocols read the
rule without importing torch.

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
