"""Experiments: one config file per experiment, a runner and a report.

Presets (``experiments.presets.PRESETS``), each a :class:`~experiments.grid.Preset` record in
a module whose docstring says what it reproduces, the command, the expected result and runtime:

* ``offline``: sklearn digits, a 64-256-256-10 MLP, P = 15 (2 CPU cores, 3-8 minutes).
* ``mnist_fc``: MNIST, the paper's 784-800-500-10 MLP (GPU hosts; MNIST downloaded on first use).
* ``cifar10_resnet18`` / ``cifar10_vgg``: CIFAR-10 (GPU hosts; downloaded on first use).

Commands:

    python -m experiments.run PRESET [--tiny] [--out DIR]     # results.jsonl
    python -m experiments.report DIR/results.jsonl [--out DIR] # PNG plots and report.md
    python -m experiments.combine_timing [--out FILE]          # combiner cost vs P and D
"""
