"""PyBullet implementations of pickcell's hardware interfaces, object catalogs and the benchmark.

The only package that imports pybullet. Every call passes `physicsClientId` explicitly.
"""
