"""Standalone evaluation: ``python -m torchtitan_mtp.eval --job.config_file X.toml``.

Also under torchrun for data-parallel evaluation. See ``torchtitan_mtp.train.evaluate_main``.
"""

from .train import evaluate_main

if __name__ == "__main__":
    evaluate_main()
