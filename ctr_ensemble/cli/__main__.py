"""``python -m ctr_ensemble.cli``: what torchrun and the tests start."""

from ctr_ensemble.cli import main

main()
