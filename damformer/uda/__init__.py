"""Unsupervised domain adaptation by self-training (DACS as in DAFormer, with DAM-Former's additions)."""
