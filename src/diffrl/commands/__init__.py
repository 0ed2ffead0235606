"""What ``diffrl train`` runs: a config's training run, and the offline quickstart. The top layer: it combines
the trainers (:mod:`diffrl.recipes`) with evaluation and reports (:mod:`diffrl.evaluate`)."""
