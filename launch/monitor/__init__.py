"""What a training run reports: TensorBoard events and a progress bar (rank 0), from figures reduced
over all ranks once per log step. Imports nothing else of ``launch``.

    config          LoggingConfig: the run config's ``logging`` section
    run_monitor     Monitor: the run's scalars, routing figures and images, and the tqdm bar
    routing         IntervalMetrics: routing, hidden-unit and all-to-all figures of an interval, one all-reduce
    throughput      model TFLOP/s and MFU
    tags            every tag the run writes, with its meaning and unit
    event_writer    a TensorBoard event writer: described tags, exact bars, images, text
    event_reader    reading a finished run's events back (the comparison report)
    balance_images  load-balance and hidden-unit images on fixed colour scales
    board           ``sigma-moe board``: TensorBoard with the loader that shows tag descriptions
"""
