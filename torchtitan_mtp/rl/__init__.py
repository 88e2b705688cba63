"""RL post-training pieces: policy-gradient losses (``losses``) and OCC calibration (``occ``).

``losses`` holds the RLVR algorithm of OCC_SPEC §4 (GRPO advantages, DAPO extras, the
clipped surrogate, aggregation, k3 KL); ``occ`` holds the Optimal Coefficient Calibration
of OCC_SPEC §3 that sets each MTP head's policy-loss coefficient online.
"""
