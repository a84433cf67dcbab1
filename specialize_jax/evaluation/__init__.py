"""Evaluation layer: scoring predictions against SeqIO eval tasks, decoding loops, sweeps, reports."""
