"""``sigma-moe compare``: a parameter-equal grid of runs, each in its own process, and its report.
The top of ``launch``: it runs :func:`sigma_moe.launch.train.train`; nothing else in ``launch`` but the
CLI imports it.

    spec                the spec YAML -> the grid of runs, each sized to the match variant's parameters
    run_spec            one resolved run of the grid, and its fingerprint (a finished run is reused or refused)
    grid                run the grid (one child process per run, resumable) and write the report
    worker              the child process of one run
    report              results.md / results.csv from the runs' results and events
    plots               the report's PNG plots
    tensorboard_export  the grid in TensorBoard: HParams sessions, custom-scalars layout, the spec as text
"""
