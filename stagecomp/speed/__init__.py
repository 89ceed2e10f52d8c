"""Compressing to a measured speed-up: the parts the ``Speedup`` strategy is built from.

- ``rank_grid``: the ranks worth timing (multiples of the vector width, ~1/8 apart);
- ``error_curves``: what each choice costs in accuracy (weight or output error);
- ``layer_table``: per layer, every choice with its measured latency and its error;
- ``allocation``: the global Lagrangian split of a latency budget over the layers;
- ``model_clock``: the whole model timed as it will run, choices swapped in;
- ``closed_loop``: budget, allocate, measure, adjust, until the measured speed-up is the
  one asked for.
"""
