"""Evaluation of a trained model: scores and metrics (``evaluation``, ``metrics``), the KL on
the true manifold's chart, FID (``fid``) and plots (``plots``, matplotlib). Import the module
you need; this package imports none of them, so that it stays light."""
