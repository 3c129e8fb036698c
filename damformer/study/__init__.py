"""Ablation studies: a grid of (configuration, seed) trainings run, tracked and compared as one job.

See :mod:`damformer.study.command` for the command, :mod:`damformer.study.spec` for the study file.
"""
