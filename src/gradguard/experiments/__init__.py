"""Experiments: the seed article's before/after study and the classic exploding-gradient tasks.

All experiments train through one loop (``loop.train``) that takes a model, data and a Guard.
"""
