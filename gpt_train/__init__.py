"""The machinery behind the commands at the repository root: one module per job.

The root holds what a user runs and reads first (config.py, dataset.py, model.py, train.py,
sample.py, evaluate.py, export.py, plot.py); everything they share lives here. No module of this
package imports a command.
"""
