"""Cross-stage workflows: compress -> export -> eval -> bench driven as one, above the stages.

    run     one budget into a run directory (the layout, once: ``RunDir``), and latency on one clock
    report  one report.md for a run directory from what the stages saved
    sweep   many budgets from one factorisation: the accuracy / size / latency Pareto curve
    fit     the least compression that meets a target latency or INT8 file size
    study   every compress step on/off at equal budgets, scored on real labelled images

Each is a frozen config plus one function (``run_sweep(base, SweepConfig)``, ``run_fit``,
``run_study(StudyConfig)``) with a thin CLI (``python -m runtime sweep|fit|study|report``).
Only these modules drive several stages; runtime's own modules (backends, benchmark, memory,
evaluate, profile, engine, machine probes) measure, using compress and export only through
their public names (evaluate loads the compressed PyTorch model with compress.load_compressed).
"""
